"""Held-out English from other sources than the training corpus: bits per byte of a trained BLT, of its entropy
model and of `xz -9`, on pieces of at most 2, 4 and 16 KB and on a 64 KB excerpt of each text (each piece scored as
a document of its own, as xz compresses it on its own; every byte of the excerpt in a piece, so the means over
the texts weigh the same bytes at every piece size); xz's figure on each whole file is reported beside.

The models score strided windows (`--context`, default half the window): every byte is predicted from at least
that many bytes before it where its piece has them, as xz sees everything before a byte. The BLT's figure on
non-overlapping windows (each window's first bytes predicted from almost nothing) is reported beside as
`blt_no_context`.

    python benchmarks/generalization.py --model runs/demo/blt          # after `make demo`
Writes benchmarks/results/generalization.json and prints a table. The texts are ../shared/data/webtext/*.txt and the
two English versions of Genesis; they are not in the demo corpus.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from blt.training.data import Document, build_stream, stream_entropies
from blt.training.evaluate import evaluate_stream
from blt.training.recipes import resolve_model_dir, xz_bpb
from blt.weights import load_blt

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PIECES = (2048, 4096, 16384)
EXCERPT = 65536  # bytes of each text that are scored (the models run at a few tens of KB/s on 2 cores)


def texts() -> dict[str, bytes]:
    files = sorted((SHARED / "webtext").glob("*.txt")) + [
        SHARED / "genesis" / f"english-{v}.txt" for v in ("kjv", "web")
    ]
    return {f.stem: f.read_bytes() for f in files if f.is_file()}


def pieces(data: bytes, size: int) -> list[bytes]:
    """`data` cut into pieces of at most `size` bytes, the last one shorter: every byte is scored at every
    piece size, so that each text weighs its bytes in every mean."""
    return [data[i : i + size] for i in range(0, len(data), size)]


def model_bpb(model, docs: list[bytes], seq_len: int, context: int = 0) -> float:
    """bpb over `docs`, each framed as its own document; the BLT patches with entropies in document context."""
    stream = build_stream([Document(str(i), d) for i, d in enumerate(docs)])
    ent = stream_entropies(model.entropy_model, stream) if hasattr(model, "local_encoder") else None
    return evaluate_stream(model, stream, seq_len, entropies=ent, context=context)["bpb"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/demo/blt", help="a BLT run folder (its best/ is used when present)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--context", type=int, help="bytes of context of each scored window (default: seq-len / 2)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generalization.json"))
    args = p.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED} is absent: the held-out texts live in ../shared/data")
    torch.set_num_threads(2)
    context = args.seq_len // 2 if args.context is None else args.context
    if args.seq_len < 2 or not 0 <= context < args.seq_len:
        p.error(f"--context must be from 0 to --seq-len - 1, got {context} with --seq-len {args.seq_len}")
    model = load_blt(resolve_model_dir(args.model))
    entropy_model = model.entropy_model
    rows, start = [], time.time()
    for name, whole in texts().items():
        data = whole[:EXCERPT]
        row = {"text": name, "bytes": len(data), "file_bytes": len(whole), "xz_whole_file": xz_bpb(whole)}
        for size in (*PIECES, None):
            docs = [data] if size is None else pieces(data, size)
            key = "excerpt" if size is None else f"{size // 1024}KB"
            total = sum(len(d) for d in docs)
            row[key] = {
                "blt": model_bpb(model, docs, args.seq_len, context),
                "entropy_model": model_bpb(entropy_model, docs, args.seq_len, context),
                "blt_no_context": model_bpb(model, docs, args.seq_len),
                "xz": sum(xz_bpb(d) * len(d) for d in docs) / total,
            }
        rows.append(row)
        print(name, json.dumps({k: v for k, v in row.items() if isinstance(v, dict)}), flush=True)
    summary = {}
    for key in [k for k in rows[0] if isinstance(rows[0][k], dict)]:
        key_rows = [r for r in rows if key in r]
        weight = sum(r["bytes"] for r in key_rows)
        summary[key] = {
            m: sum(r[key][m] * r["bytes"] for r in key_rows) / weight
            for m in ("blt", "entropy_model", "xz", "blt_no_context")
        }
        summary[key]["blt_beats_xz_on"] = [r["text"] for r in rows if r[key]["blt"] < r[key]["xz"]]
        summary[key]["blt_beats_entropy_model_on"] = [
            r["text"] for r in rows if r[key]["blt"] < r[key]["entropy_model"]
        ]
    result = {
        "benchmark": "generalization",
        "model": str(args.model),
        "params": model.num_params(),
        "seq_len": args.seq_len,
        "context": context,
        "seconds": time.time() - start,
        "texts": rows,
        "byte_weighted_mean": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'pieces':>8} {'BLT':>7} {'entropy':>8} {'xz -9':>7} {'BLT, no context':>16}   BLT < xz on")
    for key, s in summary.items():
        wins = ", ".join(s["blt_beats_xz_on"]) or "-"
        print(f"{key:>8} {s['blt']:7.3f} {s['entropy_model']:8.3f} {s['xz']:7.3f} {s['blt_no_context']:16.3f}   {wins}")
    assert all(math.isfinite(s["blt"]) for s in summary.values())


if __name__ == "__main__":
    main()
