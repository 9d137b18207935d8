"""`blt demo`: the whole job on a corpus every Python installation carries.

The corpus is the standard library's own documentation: the help topics of `pydoc_data.topics` (what
`help("if")` prints), cut into sections. It trains a small entropy model, calibrates the entropy
threshold to 4.5-byte patches, trains a small BLT on the same text, and reports validation bits per
byte next to a unigram byte model's, the mean patch size, and a generated sample. Everything lands in
`runs/demo/`, and every step is one of the `blt` commands, so the run can be repeated piece by piece.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from blt.errors import BltError
from blt.experiments.visualize import loss_curves_png, patch_html, patch_png, patch_view
from blt.rundir import claim, is_ours
from blt.training.data import build_stream, read_documents, split_documents
from blt.training.evaluate import unigram_bpb
from blt.training.recipes import train_blt, train_entropy
from blt.weights import load_blt

SAMPLE_PROMPT = "The if statement is used for"
SECTION_BYTES = 3000


def stdlib_corpus() -> list[tuple[str, str]]:
    """(name, text) documents: pydoc's help topics cut at blank lines into ~3 KB sections. Where pydoc_data
    is missing (some distributions strip it) this is a clear error: the demo never imports other modules to
    read their docstrings, as importing runs their code."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise BltError(
            "the demo corpus (pydoc_data.topics, part of the standard library) is missing from this Python; "
            "train on your own text with `blt train-entropy` and `blt train` instead"
        ) from None
    docs = []
    for name in sorted(topics):
        section, n = [], 0
        for para in topics[name].split("\n\n"):
            section.append(para)
            if sum(len(p) for p in section) > SECTION_BYTES:
                docs.append((f"{name}-{n}", "\n\n".join(section)))
                section, n = [], n + 1
        if section:
            docs.append((f"{name}-{n}", "\n\n".join(section)))
    return docs


def write_corpus(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, (name, text) in enumerate(stdlib_corpus()):
        (directory / f"{i:04d}-{name}.txt").write_text(text, encoding="utf-8")
    return directory


def run_demo(
    out: str | Path = "runs/demo", entropy_steps: int = 300, blt_steps: int = 220, quiet: bool = False
) -> dict:
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    start = time.time()
    out = Path(out)
    if out.exists() and is_ours(out, "demo"):
        say(f"replacing the previous demo run in {out}")
    claim(out, "demo", "blt demo", replace=True)  # refuses any folder the demo did not make
    corpus = write_corpus(out / "corpus")
    docs = read_documents([corpus])
    train_docs, val_docs = split_documents(docs)
    say(
        f"corpus: the standard library's help topics, {sum(len(d.data) for d in docs) / 1e3:.0f} KB in "
        f"{len(docs)} sections "
        f"({len(val_docs)} held out for validation)"
    )

    say("\n[1/3] training the entropy model (a small byte LM)")
    ent = train_entropy(
        [str(corpus)], out / "entropy", preset="demo", max_steps=entropy_steps, device="cpu", progress=not quiet
    )
    say(f"      validation bpb {ent['bpb']:.3f}")

    say("\n[2/3] training BLT (entropy patching, threshold calibrated to 4.5-byte patches)")
    res = train_blt(
        [str(corpus)],
        out / "blt",
        entropy_model=out / "entropy",
        preset="demo",
        max_steps=blt_steps,
        device="cpu",
        cache_dir=out / "cache",
        progress=not quiet,
    )

    say("\n[3/3] sampling and drawing patches")
    model = load_blt(out / "blt")
    sample = model.generate([SAMPLE_PROMPT], max_new_bytes=160, temperature=0.7, top_k=20, seed=0)[0]

    text, byte_starts, byte_entropy, threshold = patch_view(model, val_docs[0].data[:240])
    (out / "patches.html").write_text(
        patch_html(text, byte_starts, byte_entropy, threshold, "BLT entropy patches (demo)"), encoding="utf-8"
    )
    patch_png(
        out / "patches.png",
        text[:96],
        byte_starts,
        byte_entropy,
        threshold,
        "Entropy of each byte under the demo entropy model",
    )
    loss_curves_png(out / "loss.png", {"entropy model": out / "entropy", "BLT": out / "blt"})

    train_stream, val_stream = build_stream(train_docs), build_stream(val_docs)
    unigram = unigram_bpb(train_stream, val_stream)
    minutes = (time.time() - start) / 60
    say("\n" + "=" * 72)
    say(
        f"validation bits per byte   BLT {res['bpb']:.3f}   entropy model {ent['bpb']:.3f}   unigram bytes "
        f"{unigram:.3f}"
    )
    say(f"mean patch size            {res['mean_patch_bytes']:.2f} bytes (threshold {threshold:.3f} nats)")
    say(f"parameters                 BLT {res['params'] / 1e6:.2f} M")
    say(f"sample  {SAMPLE_PROMPT!r} ->")
    say("        " + (SAMPLE_PROMPT + sample.decode("utf-8", errors="replace")).replace("\n", "\n        "))
    say(f"written  {out}/entropy/  {out}/blt/  {out}/patches.html  {out}/patches.png  {out}/loss.png")
    say(f"done in {minutes:.1f} minutes")
    return {
        "bpb": res["bpb"],
        "entropy_bpb": ent["bpb"],
        "unigram_bpb": unigram,
        "mean_patch_bytes": res["mean_patch_bytes"],
        "sample": sample,
        "minutes": minutes,
    }


if __name__ == "__main__":
    run_demo()
    sys.exit(0)
