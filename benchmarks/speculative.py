"""Speculative decoding: acceptance rate, bytes per full-model pass and new bytes/s of greedy generation with
speculate = 0 (plain), 2, 4, 8, for both drafts ("self": the local encoder and decoder past the patch boundary;
"entropy": the entropy model), on `benchmarks/generate.py`'s models (random weights) and, with --model, on a
trained model directory. Every speculative output is checked against the plain one (byte-identical).

Writes benchmarks/results/speculative.json.

    python benchmarks/speculative.py [--configs tiny,layout1b] [--new-bytes 512] [--model runs/demo/blt]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import PROMPT, RESULTS, build  # noqa: E402  (the sibling benchmark's models)

from blt.inference import SpeculationStats, generate  # noqa: E402
from blt.weights import load_blt  # noqa: E402


def measure(model, name: str, new_bytes: int, rows: list[dict], save, ks=(0, 2, 4, 8)) -> None:
    drafts = ["self"] + (["entropy"] if model.patcher.mode == "entropy" else [])
    generate(model, [PROMPT], 16, stop_at_eos=False)  # warm-up
    t = time.perf_counter()
    plain = generate(model, [PROMPT], new_bytes, stop_at_eos=False)[0]
    plain_rate = new_bytes / (time.perf_counter() - t)
    rows.append({"model": name, "draft": None, "speculate": 0, "bytes_per_s": plain_rate, "bytes_per_pass": 1.0})
    print(json.dumps(rows[-1]), flush=True)
    save()
    for draft in drafts:
        for k in ks:
            if k == 0:
                continue
            stats = SpeculationStats()
            t = time.perf_counter()
            out = generate(model, [PROMPT], new_bytes, stop_at_eos=False, speculate=k, draft=draft, stats=stats)[0]
            rate = new_bytes / (time.perf_counter() - t)
            rows.append(
                {
                    "model": name,
                    "draft": draft,
                    "speculate": k,
                    "bytes_per_s": rate,
                    "speedup_vs_plain": rate / plain_rate,
                    "acceptance_rate": stats.acceptance_rate,
                    "bytes_per_pass": stats.bytes_per_pass,
                    "passes": stats.passes,
                    "identical_to_plain": out == plain,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,layout1b")
    parser.add_argument("--new-bytes", type=int, default=512)
    parser.add_argument("--model", help="also a trained model directory")
    parser.add_argument("--note", default="", help="a note for the JSON (e.g. that the machine was shared)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows: list[dict] = []
    out = {
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "note": args.note,
        "prompt": PROMPT,
        "new_bytes": args.new_bytes,
        "greedy": True,
        "dtype": "float32",
        "runs": rows,
    }
    RESULTS.mkdir(exist_ok=True)

    def save():  # after every run: a long measurement interrupted still leaves what it measured
        (RESULTS / "speculative.json").write_text(json.dumps(out, indent=2) + "\n")

    for name in filter(None, args.configs.split(",")):
        measure(build(name), f"{name} (random weights)", args.new_bytes, rows, save)
    if args.model:
        measure(load_blt(args.model, device="cpu").eval(), args.model, args.new_bytes, rows, save)


if __name__ == "__main__":
    main()
