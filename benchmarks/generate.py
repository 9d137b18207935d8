"""Generation speed: new bytes/s of (a) our cached generation, (b) ours recomputing everything per byte,
(c) transformers' BltForCausalLM.generate(use_cache=False), on the same weights with the same greedy
output, at 256 and 1024 new bytes, for a tiny and a ~20M-parameter config; and our latency per byte
over positions 0..4096.

Writes benchmarks/results/generate.json and benchmarks/results/generate_latency.png.

`layout1b` is a ~0.2M-parameter model in the 1B release's layout: one encoder layer, three decoder layers
with cross-attention on every layer, hash n-grams 3..8, a 512-byte window, a 3-layer entropy model. The
`step_profile` section counts ATen calls per decode step (torch.profiler, every nested call) and times a step.

    python benchmarks/generate.py [--lengths 256,1024] [--configs tiny,small,layout1b] [--latency-bytes 4096]
    python benchmarks/generate.py --quick      # a smoke run: step profile only, short lengths
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

import blt
from blt.config import PatchingConfig
from blt.inference import generate_recompute
from blt.model.blt import init_weights
from blt.model.patching import EntropyPatcher, threshold_for_mean_patch
from blt.presets import blt_preset, entropy_preset
from blt.weights.hf import save_hf

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "The with statement is used to wrap the execution of a block with methods defined by a context manager."
SPECIAL = [0, 1, 2, 3]


def build(name: str) -> blt.BLT:
    """A model of preset `name` (or `layout1b`) with a random entropy model whose threshold gives ~4.5-byte patches."""
    torch.manual_seed(0)
    config, _ = blt_preset("tiny" if name == "layout1b" else name)
    config.cross_attn_nheads = None  # transformers' cross-attention heads, so both sides run one model
    em_config, _ = entropy_preset("tiny" if name in ("tiny", "layout1b") else "demo")
    if name == "layout1b":
        config = dataclasses.replace(config, n_layers_local_decoder=3, encoder_hash_byte_group_size=[3, 4, 5, 6, 7, 8])
        em_config = dataclasses.replace(em_config, n_layers=3, sliding_window=512)
    em = blt.EntropyModel(em_config)
    init_weights(em)
    with torch.no_grad():
        em.output.weight.mul_(8.0)  # a peaked random LM: entropies vary from byte to byte
    from blt.experiments.corpus import stdlib_corpus

    sample = torch.stack([blt.encode(t.encode()[:511]) for _, t in stdlib_corpus()[:16] if len(t.encode()) >= 511])
    theta = threshold_for_mean_patch(list(em.entropies(sample)), 4.5)
    model = blt.BLT(
        dataclasses.replace(config, patching=PatchingConfig(mode="entropy", threshold=theta)),
        patcher=EntropyPatcher(em, theta),
    )
    with torch.no_grad():
        model.local_decoder.output.weight.mul_(4.0)
    return model.eval()


def bytes_per_s(fn, n_bytes: int) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return n_bytes / (time.perf_counter() - t), out


def compare(name: str, lengths: list[int]) -> dict:
    from transformers import BltForCausalLM

    model = build(name)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp)
        hf = BltForCausalLM.from_pretrained(tmp).eval()
    prompt_ids = model.encode(PROMPT)[None]
    result = {
        "config": name,
        "params": model.num_params(),
        "params_without_embeddings": model.num_params(embeddings=False),
        "runs": [],
    }
    for n in lengths:
        cached_rate, cached = bytes_per_s(lambda: model.generate([PROMPT], n, stop_at_eos=False)[0], n)
        recompute_rate, recomputed = bytes_per_s(
            lambda: generate_recompute(model, [PROMPT], n, stop_at_eos=False)[0], n
        )

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

        hf_rate, theirs = bytes_per_s(hf_generate, n)
        ids = torch.cat([prompt_ids[0], torch.tensor([b + 4 for b in cached])])[None]
        result["runs"].append(
            {
                "new_bytes": n,
                "cached_bytes_per_s": cached_rate,
                "recompute_bytes_per_s": recompute_rate,
                "transformers_uncached_bytes_per_s": hf_rate,
                "speedup_vs_transformers": cached_rate / hf_rate,
                "speedup_vs_recompute": cached_rate / recompute_rate,
                "identical_output": cached == recomputed == theirs,
                "mean_patch_bytes": ids.shape[1] / int(model.patch_starts(ids)[:, : ids.shape[1]].sum()),
            }
        )
        print(json.dumps({"config": name, **result["runs"][-1]}))
    return result


def step_profile(name: str, steps: int = 50, timed: int = 300) -> dict:
    """ATen calls (all of them, nested ones included) and matmuls per decode step, and ms per step, batch 1."""
    from torch.profiler import ProfilerActivity, profile

    from blt.inference import IncrementalBLT

    model = build(name)
    engine = IncrementalBLT(model)
    nxt = engine.prefill([model.encode(PROMPT)]).argmax(-1)
    for _ in range(20):
        nxt = engine.step(nxt).argmax(-1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            nxt = engine.step(nxt).argmax(-1)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    t = time.perf_counter()
    for _ in range(timed):
        nxt = engine.step(nxt).argmax(-1)
    result = {
        "config": name,
        "params": model.num_params(),
        "aten_calls_per_step": len(events) / steps,
        "top_level_aten_calls_per_step": len(top) / steps,
        "matmuls_per_step": sum(e.name in ("aten::mm", "aten::addmm", "aten::bmm") for e in events) / steps,
        "ms_per_step": (time.perf_counter() - t) / timed * 1e3,
    }
    print(json.dumps(result))
    return result


def latency(name: str, n_bytes: int) -> dict:
    """Seconds per generated byte at every position (prompt included in the position)."""
    model = build(name)
    times = []
    t = time.perf_counter()
    for _ in model.stream([PROMPT], n_bytes, stop_at_eos=False):
        now = time.perf_counter()
        times.append(now - t)
        t = now
    start = len(model.encode(PROMPT))
    positions = list(range(start, start + len(times)))

    def around(p, width=100):
        window = [s for q, s in zip(positions, times) if p - width <= q < p + width]
        return statistics.mean(window)

    last = positions[-1] - 100
    return {
        "config": name,
        "positions": positions,
        "seconds": times,
        "mean_at_600": around(600),
        f"mean_at_{last}": around(last),
        "ratio_end_vs_600": around(last) / around(600),
    }


def plot(lat: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos, sec = lat["positions"], [s * 1e3 for s in lat["seconds"]]
    smooth = [statistics.median(sec[max(0, i - 25) : i + 25]) for i in range(len(sec))]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.plot(pos, sec, linewidth=0.4, alpha=0.35, label="per byte")
    ax.plot(pos, smooth, linewidth=1.5, label="median of 50")
    ax.axvline(600, color="#888", linestyle="--", linewidth=0.8)
    ax.set_xlabel("position (bytes)")
    ax.set_ylabel("ms per generated byte")
    ax.set_ylim(0, max(smooth) * 2)
    ax.set_title(f"Cached generation latency ({lat['config']} config, CPU, {torch.get_num_threads()} threads)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="256,1024")
    ap.add_argument("--configs", default="tiny,small")
    ap.add_argument("--latency-bytes", type=int, default=4096)
    ap.add_argument("--latency-config", default="small")
    ap.add_argument("--out", default=str(RESULTS / "generate.json"))
    ap.add_argument("--quick", action="store_true", help="smoke run: the step profile, then 64-byte comparisons")
    args = ap.parse_args()
    if args.quick:
        args.lengths, args.configs, args.latency_bytes, args.latency_config = "64", "tiny", 700, "tiny"
    lengths = [int(x) for x in args.lengths.split(",")]
    profiles = [step_profile(c) for c in ("tiny", "layout1b")]
    results = {
        "benchmark": "generate",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "prompt_bytes": len(PROMPT.encode()),
        "step_profile": profiles,
        "comparisons": [compare(c, lengths) for c in args.configs.split(",")],
    }
    lat = latency(args.latency_config, args.latency_bytes)
    plot(lat, Path(args.out).with_name("generate_latency.png"))
    results["latency"] = {k: v for k, v in lat.items() if k not in ("positions", "seconds")}
    results["targets"] = {
        ">= 50x transformers at 1024 new bytes": all(
            r["speedup_vs_transformers"] >= 50
            for c in results["comparisons"]
            for r in c["runs"]
            if r["new_bytes"] == 1024
        ),
        "latency at the end within 1.3x of position 600": lat["ratio_end_vs_600"] <= 1.3,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({"latency": results["latency"], "targets": results["targets"]}, indent=2))


if __name__ == "__main__":
    main()
