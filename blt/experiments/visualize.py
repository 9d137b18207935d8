"""Pictures of patches: coloured boundaries in the terminal, an HTML page with each patch boxed and
its bytes coloured by entropy (the value on hover), and the paper's figure: entropy per byte with the
threshold line and the patch boundaries."""

from __future__ import annotations

import html
import json
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from blt.tokenizer import EOS_ID, OFFSET
from blt.training.data import stream_entropies


def patch_view(model, data: bytes) -> tuple[bytes, list[bool], list[float] | None, float | None]:
    """What a model's patcher makes of `data`: its bytes, a patch-start flag per byte, the entropy
    of predicting each byte (None without an entropy model) and the threshold.

    BOS is left out; a `bpe` model's delimiters are not bytes, and its patches start after them."""
    ids = model.encode(data)
    entropies = None
    if model.entropy_model is not None:  # with document context, as training saw it
        entropies = torch.from_numpy(
            stream_entropies(model.entropy_model, np.asarray(ids.tolist() + [EOS_ID], dtype=np.int16))[:-1]
        )
    starts = model.patcher(
        ids[None], entropies[None] if entropies is not None and model.patcher.uses_entropy else None
    )[0]
    positions = [q for q in range(1, len(ids)) if ids[q] >= OFFSET]
    text = bytes(int(ids[q]) - OFFSET for q in positions)
    byte_starts = [bool(starts[q]) for q in positions]
    byte_entropy = (
        [float(entropies[q - 1]) for q in positions] if entropies is not None else None
    )  # H[q-1] predicts byte q
    return text, byte_starts, byte_entropy, getattr(model.patcher, "threshold", None)


def characters(data: bytes) -> list[tuple[int, int, str | None]]:
    """Split `data` into (start, end, text) units: a valid UTF-8 character, or one undecodable byte
    (text None), so that every byte is shown exactly once."""
    out, i = [], 0
    while i < len(data):
        for n in (1, 2, 3, 4):
            try:
                out.append((i, i + n, data[i : i + n].decode("utf-8")))
                i += n
                break
            except UnicodeDecodeError:
                continue
        else:
            out.append((i, i + 1, None))
            i += 1
    return out


def _shown(text: str | None, byte: int) -> str:
    """A character as it may reach a terminal: invalid UTF-8 and control characters (ESC, NUL, the C1
    range, DEL, ...) as visible \\xNN / \\u escapes, so no byte of the input can drive the terminal."""
    if text is None:
        return f"\\x{byte:02x}"
    special = {"\n": "↵\n", "\t": "⇥", "\r": "␍"}
    if text in special:
        return special[text]
    if len(text) == 1 and unicodedata.category(text) in ("Cc", "Cf", "Zl", "Zp", "Cs"):
        return f"\\x{ord(text):02x}" if ord(text) < 0x100 else f"\\u{ord(text):04x}"
    return text


def patch_groups(data: bytes, starts: Sequence[bool]) -> list[list[tuple[int, int, str | None]]]:
    """Characters grouped by patch; `starts[i]` is the patch-start flag of byte i (no BOS)."""
    groups: list[list] = []
    for unit in characters(data):
        if not groups or starts[unit[0]]:
            groups.append([])
        groups[-1].append(unit)
    return groups


def terminal(data: bytes, starts: Sequence[bool], color: bool = True) -> str:
    """Patches on alternating backgrounds (or separated by '|' without colour)."""
    parts = []
    for n, group in enumerate(patch_groups(data, starts)):
        text = "".join(_shown(t, data[s]) for s, _, t in group)
        parts.append(f"\x1b[{'44' if n % 2 else '42'};97m{text}\x1b[0m" if color else text)
    return ("" if color else "|").join(parts)


def _entropy_colour(h: float, top: float) -> str:
    x = max(0.0, min(1.0, h / top)) if top > 0 else 0.0
    return f"hsl({int(220 - 220 * x)}, 85%, {int(92 - 35 * x)}%)"  # calm blue -> hot red


def patch_html(
    data: bytes,
    starts: Sequence[bool],
    entropies: Sequence[float] | None = None,
    threshold: float | None = None,
    title: str = "BLT patches",
) -> str:
    """A standalone HTML page: each patch boxed, each byte coloured by the entropy of predicting it."""
    top = max(entropies) if entropies else 0.0
    boxes = []
    for n, group in enumerate(patch_groups(data, starts)):
        cells = []
        for s, e, t in group:
            shown = html.escape(_shown(t, data[s]))
            if entropies is not None:
                h = max(entropies[s:e])
                tip = f"bytes {s}-{e - 1}: {data[s:e].hex(' ')}; entropy {h:.3f} nats"
                cells.append(
                    f'<span class="b" style="background:{_entropy_colour(h, top)}" '
                    f'title="{html.escape(tip)}">{shown}</span>'
                )
            else:
                cells.append(f'<span class="b" title="{html.escape(data[s:e].hex(" "))}">{shown}</span>')
        boxes.append(
            f'<span class="p" title="patch {n}, {sum(e - s for s, e, _ in group)} bytes">{"".join(cells)}</span>'
        )
    legend = f"threshold {threshold:.3f} nats; " if threshold is not None else ""
    n_patches = sum(1 for _ in patch_groups(data, starts))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
.t {{ font-family: monospace; font-size: 15px; line-height: 2.1; white-space: pre-wrap; }}
.p {{ border: 1px solid #333; border-radius: 3px; padding: 1px 0; margin-right: 2px; }}
.b {{ padding: 1px 0; }}
</style></head><body>
<h2>{html.escape(title)}</h2>
<p>{len(data)} bytes in {n_patches} patches ({len(data) / max(n_patches, 1):.2f} bytes per patch). {legend}
Each box is a patch; colour is the entropy of predicting that byte (blue low, red high); hover for values.</p>
<div class="t">{"".join(boxes)}</div>
</body></html>
"""


def patch_png(
    path: str | Path,
    data: bytes,
    starts: Sequence[bool],
    entropies: Sequence[float],
    threshold: float | None = None,
    title: str = "Entropy of the next byte",
) -> None:
    """The paper's figure: entropy per byte, the threshold, and a line at every patch start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(data)
    fig, ax = plt.subplots(figsize=(max(8, min(0.16 * n, 40)), 3.6))
    ax.plot(range(n), entropies[:n], marker="o", markersize=3, linewidth=1, color="#1f5fa8", label="entropy H(x_i)")
    if threshold is not None:
        ax.axhline(threshold, color="#d62728", linestyle="--", linewidth=1, label=f"threshold {threshold:.2f}")
    for i in range(n):
        if starts[i]:
            ax.axvline(i - 0.5, color="#888", linewidth=0.6, alpha=0.7)
    labels = [_tick(data[i]) for i in range(n)]
    ax.set_xticks(range(n))
    ax.set_xticklabels(labels, fontsize=7, family="monospace")
    ax.set_xlim(-0.8, n - 0.2)
    ax.set_ylabel("entropy (nats)")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _tick(byte: int) -> str:
    c = chr(byte)
    if c == " ":
        return "␣"
    if c == "\n":
        return "↵"
    return c if 32 < byte < 127 else f"{byte:02x}"


def loss_curves_png(path: str | Path, runs: dict[str, str | Path]) -> None:
    """Training loss (bits per byte) and validation bpb against step, one line per run directory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in runs.items():
        records = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line]
        train = [(r["step"], r["loss"] / 0.6931471805599453) for r in records if "loss" in r]
        val = [(r["step"], r["val_bpb"]) for r in records if "val_bpb" in r]
        line = ax.plot(*zip(*train), linewidth=1, label=f"{name} train")[0] if train else None
        if val:
            ax.plot(
                *zip(*val),
                marker="o",
                linestyle="--",
                color=line.get_color() if line else None,
                label=f"{name} validation",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
