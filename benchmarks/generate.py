"""Generation speed, and the answer to "is BLT slower than a token model?".

- `comparisons`: new bytes/s of our cached generation (in every mode `model.generate` offers: eager, and
  `compile=True` / `speculate=k` once they exist), our recompute-everything reference and transformers'
  `BltForCausalLM.generate(use_cache=False)`, on the same weights with the same greedy output, at 256 and
  1024 new bytes, for `tiny`, `small` (~20M parameters) and `layout1b`: a ~0.2M-parameter model in the 1B
  release's layout (one encoder layer, three decoder layers with cross-attention on every layer, hash
  n-grams 3..8, a 512-byte window, a 3-layer entropy model).
- `step_profile`: ATen calls per decode step (torch.profiler, every nested call) and the time of a step.
- `batched`: aggregate new bytes/s of prompts of different lengths in batches of 1, 8 and 32, and whether
  a row gets in a batch what it gets alone.
- `flop_matched` and `release_shape` (`benchmarks/token_models.py`): BLT against token models with a KV
  cache, at equal training FLOPs (bpb and text bytes/s) and at the 1B release shape with random weights
  (text bytes/s, each stack's time against its weight-bandwidth floor).
- `latency`: seconds per byte over positions to 4096.
- `targets`: issue 10's figures, each with what was measured.

Writes benchmarks/results/generate.json, generate.md (the tables), generate_latency.png and
generate_throughput.png.

    python benchmarks/generate.py            # everything (~15 minutes on 2 quiet cores)
    python benchmarks/generate.py --quick    # a smoke run of every section (~1 minute)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from speed import generation_modes, mode_rate, random_blt, stdlib_texts, timed
from token_models import SPECIAL, flop_matched, release_shape

import blt
from blt.inference import generate_recompute
from blt.presets import blt_preset, entropy_preset
from blt.weights.hf import save_hf

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "The with statement is used to wrap the execution of a block with methods defined by a context manager."


def build(name: str) -> blt.BLT:
    """A model of preset `name` (or `layout1b`) with a random entropy model whose threshold gives ~4.5-byte patches."""
    config, _ = blt_preset("tiny" if name == "layout1b" else name)
    config = dataclasses.replace(config, cross_attn_nheads=None)  # transformers' heads: both sides run one model
    em_config, _ = entropy_preset("tiny" if name in ("tiny", "layout1b") else "demo")
    if name == "layout1b":
        config = dataclasses.replace(config, n_layers_local_decoder=3, encoder_hash_byte_group_size=[3, 4, 5, 6, 7, 8])
        em_config = dataclasses.replace(em_config, n_layers=3, sliding_window=512)
    return random_blt(config, em_config)


def compare(name: str, lengths: list[int]) -> dict:
    """Cached (every mode), recompute and transformers' uncached generation of one config, greedy."""
    from transformers import BltForCausalLM

    model = build(name)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp)
        hf = BltForCausalLM.from_pretrained(tmp).eval()
    prompt_ids = model.encode(PROMPT)[None]
    modes, skipped = generation_modes(model)
    result = {
        "config": name,
        "params": model.num_params(),
        "params_without_embeddings": model.num_params(embeddings=False),
        "skipped_modes": skipped,
        "runs": [],
    }
    for n in lengths:
        cached = {mode: mode_rate(model, [PROMPT], n, kwargs) for mode, kwargs in modes}
        recompute_s, recomputed = timed(lambda: generate_recompute(model, [PROMPT], n, stop_at_eos=False)[0])

        def hf_generate():
            with torch.no_grad():
                out = hf.generate(
                    prompt_ids,
                    max_new_tokens=n,
                    do_sample=False,
                    use_cache=False,
                    suppress_tokens=SPECIAL,
                    pad_token_id=0,
                )
            return blt.tokenizer.ids_to_bytes(out[0, prompt_ids.shape[1] :])

        hf_s, theirs = timed(hf_generate)
        best = max(cached, key=lambda m: cached[m]["bytes_per_s"])
        result["runs"].append(
            {
                "new_bytes": n,
                "cached_bytes_per_s": {m: r["bytes_per_s"] for m, r in cached.items()},
                "warmup_seconds": {m: r["warmup_seconds"] for m, r in cached.items()},
                "recompute_bytes_per_s": n / recompute_s,
                "transformers_uncached_bytes_per_s": n / hf_s,
                "best_mode": best,
                "speedup_vs_transformers": cached[best]["bytes_per_s"] * hf_s / n,
                "speedup_vs_recompute": cached[best]["bytes_per_s"] * recompute_s / n,
                "identical_output": all(r["outputs"][0] == recomputed == theirs for r in cached.values()),
                "mean_patch_bytes": cached["eager"]["mean_patch_bytes"],
            }
        )
        print(json.dumps({"config": name, **result["runs"][-1]}))
    return result


def batched(name: str, batches: list[int], n_bytes: int, compile: bool = False) -> dict:
    """Aggregate new bytes/s of `max(batches)` standard-library prompts of 20 to ~400 bytes, greedy, the first
    b of them in one batch for each b (eager, or `compile`: each batch size compiles in the warm-up call); rows 0
    and b-1 of each batch are checked against their output alone (eager)."""
    model = build(name)
    texts = [t for t in stdlib_texts() if len(t) >= 400]
    prompts = [texts[i][: 20 + i * 97 % 380] for i in range(max(batches))]
    alone = {}
    runs = []
    for b in batches:
        rate = mode_rate(model, prompts[:b], n_bytes, {"compile": True} if compile else {})
        checked = sorted({0, b - 1})
        for i in checked:
            if i not in alone:
                alone[i] = model.generate([prompts[i]], n_bytes, stop_at_eos=False)[0]
        runs.append(
            {
                "batch": b,
                "aggregate_bytes_per_s": rate["bytes_per_s"],
                "rows_checked": checked,
                "identical_to_alone": all(rate["outputs"][i] == alone[i] for i in checked),
            }
        )
        print(json.dumps({"config": name, **runs[-1]}))
    return {
        "config": name,
        "mode": "compile" if compile else "eager",
        "new_bytes_per_row": n_bytes,
        "prompt_bytes": [len(p) for p in prompts],
        "runs": runs,
        "speedup_largest_batch_vs_1": runs[-1]["aggregate_bytes_per_s"] / runs[0]["aggregate_bytes_per_s"],
    }


def step_profile(name: str, steps: int = 50, timed_steps: int = 300, compile: bool = False) -> dict:
    """ATen calls (all of them, nested ones included) and matmuls per decode step, and ms per step, batch 1;
    eager, or with the step's parts compiled (`compile`: compilation happens in the warm-up steps)."""
    from torch.profiler import ProfilerActivity, profile

    from blt.inference import IncrementalBLT

    model = build(name)
    engine = IncrementalBLT(model, compile=compile)
    nxt = engine.prefill([model.encode(PROMPT)]).argmax(-1)
    for _ in range(20):
        nxt = engine.step(nxt).argmax(-1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            nxt = engine.step(nxt).argmax(-1)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    t = time.perf_counter()
    for _ in range(timed_steps):
        nxt = engine.step(nxt).argmax(-1)
    result = {
        "config": name,
        "mode": "compile" if compile else "eager",
        "params": model.num_params(),
        "aten_calls_per_step": len(events) / steps,
        "top_level_aten_calls_per_step": len(top) / steps,
        # compiled, the C++ wrapper calls the matmul kernels past the dispatcher, where the profiler does not see them
        "matmuls_per_step": (sum(e.name in ("aten::mm", "aten::addmm", "aten::bmm") for e in events) / steps) or None,
        "ms_per_step": (time.perf_counter() - t) / timed_steps * 1e3,
    }
    print(json.dumps(result))
    return result


def latency(name: str, n_bytes: int, repeats: int = 3) -> dict:
    """Seconds per generated byte at every position (prompt included in the position), eager and compiled
    (after a warm-up call that compiles), each position's mean over `repeats` identical greedy runs.

    A byte's cost depends on whether its step closes a patch (the global step runs then), so a stretch of
    text with more patches per byte costs more whatever its position. Beside the raw ratio of the last 200
    bytes to the 200 around position 600, `ratio_at_mean_patch_rate` weighs each stretch's closing and other
    steps by the run's overall share of closing steps: what position alone costs."""
    model = build(name)
    prompt = model.encode(PROMPT)
    start = len(prompt)
    modes = {}
    for mode, kwargs in (("eager", {}), ("compile", {"compile": True})):
        model.generate([PROMPT], 64, stop_at_eos=False, **kwargs)
        runs = []
        for _ in range(repeats):
            times, new = [], bytearray()
            t = time.perf_counter()
            for (piece,) in model.stream([PROMPT], n_bytes, stop_at_eos=False, **kwargs):
                now = time.perf_counter()
                times.append(now - t)
                new += piece
                t = now
            runs.append(times)
        times = [statistics.mean(col) for col in zip(*runs)]
        positions = list(range(start, start + len(times)))
        # the step that yields the byte at position p consumed p - 1 and closed a patch if p starts one
        starts = model.patch_starts(torch.cat([prompt, model.encode(bytes(new), bos=False)])[None])[0]
        closes = [bool(starts[p]) if i else False for i, p in enumerate(positions)]
        rate = sum(closes) / len(closes)

        def window(p, width=100):
            return [(s, c) for q, s, c in zip(positions, times, closes) if p - width <= q < p + width]

        def stretch(p):
            rows = window(p)
            closing = [s for s, c in rows if c]
            closing_mean = statistics.mean(closing)
            other_mean = statistics.mean(s for s, c in rows if not c)
            return {
                "mean": statistics.mean(s for s, _ in rows),
                "closing_steps": len(closing),
                "bytes": len(rows),
                "mean_closing": closing_mean,
                "mean_other": other_mean,
                "at_mean_patch_rate": rate * closing_mean + (1 - rate) * other_mean,
            }

        last = positions[-1] - 100
        early, late = stretch(600), stretch(last)
        modes[mode] = {
            "positions": positions,
            "seconds": times,
            "repeats": repeats,
            "closing_step_share": rate,
            "at_600": early,
            f"at_{last}": late,
            "mean_at_600": early["mean"],
            f"mean_at_{last}": late["mean"],
            "ratio_end_vs_600": late["mean"] / early["mean"],
            "ratio_at_mean_patch_rate": late["at_mean_patch_rate"] / early["at_mean_patch_rate"],
        }
    return {"config": name, "modes": modes}


def plot(lat: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    top = 0.0
    for mode, run in lat["modes"].items():
        pos, sec = run["positions"], [s * 1e3 for s in run["seconds"]]
        smooth = [statistics.median(sec[max(0, i - 25) : i + 25]) for i in range(len(sec))]
        (line,) = ax.plot(pos, smooth, linewidth=1.5, label=f"{mode} (median of 50)", zorder=3)
        ax.plot(pos, sec, linewidth=0.4, alpha=0.25, color=line.get_color())
        top = max(top, max(smooth))
    ax.axvline(600, color="#888", linestyle="--", linewidth=0.8)
    ax.set_xlabel("position (bytes)")
    ax.set_ylabel("ms per generated byte")
    ax.set_ylim(0, top * 2)
    ax.set_title(f"Cached generation latency ({lat['config']} config, CPU, {torch.get_num_threads()} threads)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# in the order they run: the slowest (transformers recomputing everything per byte) last
SECTIONS = ("profile", "batched", "flop_matched", "release_shape", "latency", "compare")
# BLT-1B's generation counts toward the Llama target only at patches no longer than this (the comparison is at
# ~4.5-byte patches; a random model's greedy output can patch far more coarsely, which would flatter it)
TARGET_PATCH_BYTES = 5.0
# BLT-1B's bandwidth floors in the release section's JSON, eager (each stack apart) and compiled
FLOOR_KEYS = (("eager", "bandwidth_floor"), ("compiled", "bandwidth_floor_compiled"))
ISSUE_ATEN_CALLS_PER_STEP = 3300  # layout1b before issue 10 (torch.profiler over 50 steps)
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def settings(quick: bool) -> dict:
    """What each section runs: the full benchmark, or a smoke run of every section in about a minute."""
    if quick:
        return dict(
            profile_steps=(20, 100),
            lengths=[64],
            configs=["tiny"],
            batches=[1, 8],
            batch_configs=["tiny"],
            batch_bytes=16,
            flop_budget=2e11,
            flop_bytes=32,
            flop_data_bytes=100_000,
            entropy_steps=20,
            release_scale=8,
            release_bytes=8,
            latency_config="tiny",
            latency_bytes=700,
        )
    return dict(
        profile_steps=(50, 300),
        lengths=[256, 1024],
        configs=["tiny", "small", "layout1b"],
        batches=[1, 8, 32],
        batch_configs=["tiny", "layout1b"],
        batch_bytes=128,
        flop_budget=3e12,
        flop_bytes=256,
        flop_data_bytes=None,
        entropy_steps=300,
        release_scale=1,
        release_bytes=64,
        latency_config="small",
        latency_bytes=4096,
    )


def run_flop_matched(cfg: dict, compare_dir: str | None) -> dict:
    """`token_models.flop_matched` on tiny Shakespeare (an excerpt of its head in a quick run), in `compare_dir`
    (reused by a later run with the same settings) or a temporary folder."""
    if not SHAKESPEARE.exists():
        return {"skipped": f"{SHAKESPEARE} is absent"}
    with tempfile.TemporaryDirectory() as tmp:
        data = SHAKESPEARE
        if cfg["flop_data_bytes"]:
            data = Path(tmp) / "excerpt.txt"
            data.write_bytes(SHAKESPEARE.read_bytes()[: cfg["flop_data_bytes"]])
        out = Path(compare_dir) if compare_dir else Path(tmp) / "compare"
        return flop_matched([str(data)], cfg["flop_budget"], out, cfg["flop_bytes"], cfg["entropy_steps"])


def target(name: str, measured, met: bool | None) -> dict:
    return {"target": name, "measured": measured, "met": met}


def targets(results: dict) -> list[dict]:
    """Issue 10's speed figures, each computed from this run's measurements (None: not measured)."""
    out = []
    comparisons = results.get("comparisons", [])
    at_1024 = {
        c["config"]: r["speedup_vs_transformers"] for c in comparisons for r in c["runs"] if r["new_bytes"] == 1024
    }
    out.append(
        target(
            ">= 50x transformers' uncached generate at 1024 new bytes, every config (tiny, small, layout1b)",
            at_1024,
            all(v >= 50 for v in at_1024.values()) if {"tiny", "small", "layout1b"} <= set(at_1024) else None,
        )
    )
    profiles = {(p["config"], p.get("mode", "eager")): p for p in results.get("step_profile", [])}
    calls = {m: p["aten_calls_per_step"] for (c, m), p in profiles.items() if c == "layout1b"}
    if calls:
        out.append(
            target(
                f">= 5x fewer ATen calls per step than {ISSUE_ATEN_CALLS_PER_STEP} on layout1b",
                {"aten_calls_per_step": calls, "reduction": ISSUE_ATEN_CALLS_PER_STEP / min(calls.values())},
                ISSUE_ATEN_CALLS_PER_STEP / min(calls.values()) >= 5,
            )
        )
    steps = {f"{m}_step": p["ms_per_step"] for (c, m), p in profiles.items() if c == "tiny"}
    if steps:
        # an engine step, or a byte of the fastest generation mode (whole loop included) if faster
        ms = dict(steps)
        for c in comparisons:
            if c["config"] == "tiny":
                rates = c["runs"][-1]["cached_bytes_per_s"]
                ms.update({f"{m}_generate_per_byte": 1e3 / v for m, v in rates.items() if m != "eager"})
        out.append(target("tiny step <= 0.5 ms (batch 1)", ms, min(ms.values()) <= 0.5))
    flop = results.get("flop_matched", {})
    if "rows" in flop:
        ratio = flop["blt_over_bpe_text_bytes_per_s"]
        out.append(target("BLT text bytes/s >= the FLOP-matched BPE model's with its KV cache", ratio, ratio >= 1))
    release = results.get("release_shape")
    if release:
        for run in release["blt"]["runs"]:
            dtype = run["dtype"]
            llama = next(r for r in release["llama"]["llama-3.2-1b"] if r["dtype"] == dtype)["text_bytes_per_s"]
            best = max(  # a random model's own output patches at its own rate: counted only near ~4.5-byte patches
                [run["text_bytes_per_s"], run.get("text_bytes_per_s_compiled") or 0]
                + [
                    r["bytes_per_s"]
                    for m, r in run["generate"].items()
                    if m != "eager" and r["mean_patch_bytes"] <= TARGET_PATCH_BYTES
                ]
            )
            out.append(target(f"BLT-1B text bytes/s >= Llama-3.2-1B's ({dtype}, batch 1)", best / llama, best >= llama))
            pct = {}  # eager: each stack apart; compiled: the entropy model and the encoder are one graph
            for mode, key in FLOOR_KEYS:
                floors = run.get(key) or {}
                parts = [k for k in ("entropy_model", "entropy_model+local_encoder", "local_decoder") if k in floors]
                if parts:
                    pct[mode] = {k: floors[k]["percent_of_floor"] for k in parts}
            if pct:
                met = any(min(p.values()) >= 85 for p in pct.values())
                out.append(target(f"per-byte models >= 85% of the weight-bandwidth floor ({dtype})", pct, met))
    lat = results.get("latency")
    for key, name in (
        ("ratio_end_vs_600", "latency per byte at the end within 1.3x of position 600"),
        ("ratio_at_mean_patch_rate", "the same at the run's mean patch rate (what position alone costs; a diagnostic)"),
    ):
        if lat and all(key in run for run in lat["modes"].values()):
            ratios = {mode: run[key] for mode, run in lat["modes"].items()}
            out.append(target(name, ratios, max(ratios.values()) <= 1.3))
    return out


def plot_throughput(results: dict, path: Path) -> None:
    """Aggregate bytes/s against batch size, and text bytes/s of BLT against the token models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for b in results.get("batched", []):
        runs = b["runs"]
        label = f"{b['config']} {b.get('mode', 'eager')}"
        left.plot([r["batch"] for r in runs], [r["aggregate_bytes_per_s"] for r in runs], marker="o", label=label)
    left.set(xscale="log", yscale="log", xlabel="batch (prompts of 20 to ~400 bytes)", ylabel="aggregate new bytes/s")
    left.set_xticks(sorted({r["batch"] for b in results.get("batched", []) for r in b["runs"]}))
    left.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_title("Batched greedy generation")
    if results.get("batched"):
        left.legend()
    bars = [
        (r["model"].split(" (as ")[0], r["text_bytes_per_s"]) for r in results.get("flop_matched", {}).get("rows", [])
    ]
    release = results.get("release_shape")
    if release:
        for r in release["blt"]["runs"]:
            bars.append((f"BLT-1B {r['dtype']} eager", r["text_bytes_per_s"]))
            if r.get("text_bytes_per_s_compiled"):
                bars.append((f"BLT-1B {r['dtype']} compiled", r["text_bytes_per_s_compiled"]))
        bars += [(f"{n} {r['dtype']}", r["text_bytes_per_s"]) for n, runs in release["llama"].items() for r in runs]
    right.barh([b[0] for b in bars][::-1], [b[1] for b in bars][::-1], color="#4c72b0")
    right.set(xscale="log", xlabel="text bytes/s (batch 1, greedy)")
    right.set_title("BLT vs token models")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(header: list[str], rows: list[list]) -> list[str]:
    def cell(v):
        if v is None:
            return "—"
        if isinstance(v, dict):
            return ", ".join(f"{k} {cell(x)}" for k, x in v.items())
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    return (
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
        + [""]
    )


def markdown(results: dict) -> str:
    """The tables of the README's "Generation speed" section, from the results."""
    m = results["machine"]
    lines = [
        f"Measured on {m['threads']} CPU threads, torch {m['torch']}"
        + (", on a machine shared with other work (timings are noisy)" if results.get("machine_shared") else "")
        + (" — a --quick smoke run" if results.get("quick") else "")
        + ".",
        "",
    ]
    if "comparisons" in results:
        lines += ["New bytes/s, greedy, batch 1, same output from all:", ""]
        rows = []
        for c in results["comparisons"]:
            for r in c["runs"]:
                modes = ", ".join(f"{k} {v:.0f}" for k, v in r["cached_bytes_per_s"].items())
                rows.append(
                    [
                        c["config"],
                        r["new_bytes"],
                        modes,
                        r["recompute_bytes_per_s"],
                        r["transformers_uncached_bytes_per_s"],
                        f"{r['speedup_vs_transformers']:.1f}x",
                        r["identical_output"],
                    ]
                )
        lines += table(
            [
                "config",
                "new bytes",
                "cached (ours)",
                "recompute (ours)",
                "transformers uncached",
                "speedup",
                "identical",
            ],
            rows,
        )
    if "step_profile" in results:
        lines += table(
            ["config", "mode", "ATen calls per step", "matmuls per step", "ms per step"],
            [
                [p["config"], p.get("mode", "eager"), p["aten_calls_per_step"], p["matmuls_per_step"], p["ms_per_step"]]
                for p in results["step_profile"]
            ],
        )
    if "batched" in results:
        lines += ["Batched: prompts of 20 to ~400 bytes, aggregate new bytes/s:", ""]
        lines += table(
            ["config", "mode", "batch", "aggregate bytes/s", "rows identical to alone"],
            [
                [b["config"], b.get("mode", "eager"), r["batch"], r["aggregate_bytes_per_s"], r["identical_to_alone"]]
                for b in results["batched"]
                for r in b["runs"]
            ],
        )
    flop = results.get("flop_matched", {})
    if "rows" in flop:
        lines += [
            f"Equal training FLOPs ({flop['budget_flops']:.0e}, `blt compare`'s sizing), greedy text "
            f"bytes/s from a {flop['prompt_bytes']}-byte held-out prompt:",
            "",
        ]
        lines += table(
            ["model", "params", "held-out bpb", "inference FLOPs/byte", "text bytes/s"],
            [
                [r["model"], r["params"], r["bpb"], r["inference_flops_per_byte"], r["text_bytes_per_s"]]
                for r in flop["rows"]
            ],
        )
        breakdown = flop.get("blt_step_breakdown")
        if breakdown:
            ms = breakdown["ms_per_byte"]
            lines += [
                "BLT's step, ms per byte: "
                + ", ".join(f"{k} {v:.3g}" for k, v in ms.items())
                + f" ({breakdown['bytes_per_patch']:.2f} bytes per patch).",
                "",
            ]
    release = results.get("release_shape")
    if release:
        lines += [
            f"1B release shape, random weights, batch 1 (Llama at {release['llama_bytes_per_token']} bytes "
            f"per token); matrix-vector bandwidth "
            + ", ".join(f"{k} {v:.1f} GB/s" for k, v in release["matvec_bandwidth_gb_per_s"].items())
            + ":",
            "",
        ]
        rows = []
        for r in release["blt"]["runs"]:
            for mode, key in FLOOR_KEYS:
                floor = (r.get(key) or {}).get("whole_step_per_byte", {})
                rate = r["text_bytes_per_s"] if mode == "eager" else r.get("text_bytes_per_s_compiled")
                name = f"BLT-1B stepping through text, {mode}"
                rows.append([name, r["dtype"], rate, floor.get("weights_mb"), floor.get("percent_of_floor")])
            for mode, g in r["generate"].items():  # its own output: a random model patches it at its own rate
                name = f"BLT-1B generating, {mode} ({g['mean_patch_bytes']:.1f} bytes per patch)"
                rows.append([name, r["dtype"], g["bytes_per_s"], None, None])
        for name, runs in release["llama"].items():
            for r in runs:
                rows.append(
                    [
                        name,
                        r["dtype"],
                        r["text_bytes_per_s"],
                        r["weights_read_mb_per_text_byte"],
                        r["bandwidth_floor_per_token"]["percent_of_floor"],
                    ]
                )
        lines += table(
            ["model", "dtype", "text bytes/s", "weights read per text byte (MB)", "% of bandwidth floor"], rows
        )
        rows = [
            [
                r["dtype"],
                mode,
                part,
                f["weights_mb"],
                f["floor_ms"],
                f["measured_ms"],
                f["percent_of_floor"],
                f.get("matmul_chain_ms"),
                f.get("chain_percent_of_floor"),
                f.get("percent_of_matmul_chain"),
            ]
            for r in release["blt"]["runs"]
            for mode, key in FLOOR_KEYS
            for part, f in (r.get(key) or {}).items()
        ]
        header = [
            "dtype",
            "mode",
            "BLT-1B part",
            "weights read (MB)",
            "floor (ms)",
            "measured (ms)",
            "% of floor",
            "its matrix products alone (ms)",
            "theirs, % of floor",
            "step, % of its matrix products",
        ]
        lines += table(header, rows)
    if "targets" in results:
        lines += table(
            ["target", "measured", "met"],
            [[t["target"], t["measured"], t["met"]] for t in results["targets"]],
        )
    return "\n".join(lines)


def machine() -> dict:
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    return {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_at_end": load,
    }


def write(results: dict, out: Path) -> None:
    """The JSON, its tables (.md) and the throughput figure, with the targets as measured so far."""
    results["machine"] = machine()
    results["targets"] = targets(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results) + "\n")
    plot_throughput(results, out.with_name(f"{out.stem}_throughput.png"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run of every section, about a minute")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="run these, keep the others from --out")
    ap.add_argument("--compare-dir", help="folder for the FLOP-matched training runs (reused when it matches)")
    ap.add_argument("--machine-shared", action="store_true", help="record that other work ran at the same time")
    ap.add_argument("--out", help="default: results/generate.json, or a temporary file with --quick")
    args = ap.parse_args()
    cfg = settings(args.quick)
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    out = Path(
        args.out
        or (Path(tempfile.gettempdir()) / "blt_generate_quick.json" if args.quick else RESULTS / "generate.json")
    )
    results = json.loads(out.read_text()) if out.exists() and len(sections) < len(SECTIONS) else {}
    results.update({"benchmark": "generate", "quick": args.quick, "machine_shared": args.machine_shared})
    results["prompt_bytes"] = len(PROMPT.encode())
    runs = {
        "profile": (
            "step_profile",
            lambda: [
                step_profile(c, *cfg["profile_steps"], compile=compiled)
                for c in ("tiny", "layout1b")
                for compiled in (False, True)
            ],
        ),
        "compare": ("comparisons", lambda: [compare(c, cfg["lengths"]) for c in cfg["configs"]]),
        "batched": (
            "batched",
            lambda: [
                batched(c, cfg["batches"], cfg["batch_bytes"], compile=m)
                for c in cfg["batch_configs"]
                for m in (False, True)
            ],
        ),
        "flop_matched": ("flop_matched", lambda: run_flop_matched(cfg, args.compare_dir)),
        "release_shape": ("release_shape", lambda: release_shape(cfg["release_bytes"], cfg["release_scale"])),
        "latency": ("latency", lambda: latency(cfg["latency_config"], cfg["latency_bytes"])),
    }
    seconds = results.setdefault("section_seconds", {})
    for section in (s for s in SECTIONS if s in sections):
        key, run = runs[section]
        seconds[section], results[key] = timed(run)
        print(f"{section}: {seconds[section]:.0f} s", flush=True)
        if section == "latency":
            lat = results["latency"]
            plot(lat, out.with_name(f"{out.stem}_latency.png"))
            for run in lat["modes"].values():
                del run["positions"], run["seconds"]
        write(results, out)  # after every section: a run cut short keeps what it measured
    print(json.dumps(results["targets"], indent=2))


if __name__ == "__main__":
    main()
