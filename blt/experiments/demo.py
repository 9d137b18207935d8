"""`blt demo`: the whole job on a corpus that needs no download.

The corpus (`blt.experiments.corpus`) is English prose read as files from the standard library (pydoc's help
topics and the docstrings and comments of the library's own modules, never imported), Shakespeare's plays
(tiny Shakespeare) and four public-domain books (the English texts of the Canterbury Corpus and the Jargon
File), the last two shipped in the package. The demo trains a small
entropy model, calibrates the entropy threshold to 4.5-byte patches, trains a small BLT on the same text, and
reports validation bits per byte next to a unigram byte model's, the mean patch size, and samples. Everything
lands in `runs/demo/`, and every step is one of the `blt` commands, so the run can be repeated piece by piece.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import torch

from blt.experiments.corpus import books_corpus, shakespeare_corpus, stdlib_corpus
from blt.experiments.visualize import loss_curves_png, patch_html, patch_png, patch_view
from blt.presets import BLT_PRESETS, ENTROPY_PRESETS
from blt.rundir import claim, is_ours
from blt.training.data import build_stream, read_documents, split_documents
from blt.training.evaluate import unigram_bpb
from blt.training.loop import check_precision, cpu_has_bf16_units
from blt.training.recipes import train_blt, train_entropy
from blt.weights import load_blt

SAMPLE_PROMPT = "The if statement is used for"
ENTROPY_STEPS = ENTROPY_PRESETS["demo"][1].max_steps
BLT_STEPS = BLT_PRESETS["demo"][1].max_steps
CORPUS_BYTES = None  # all of it (about 5 MB): more varied text generalizes better


def write_corpus(directory: Path, max_bytes: int | None = CORPUS_BYTES) -> Path:
    """The standard library's prose, tiny Shakespeare and the four books, a file per document in `directory`;
    with `max_bytes`, whole documents in that order up to that many bytes (None: all of it)."""
    directory.mkdir(parents=True, exist_ok=True)
    docs = stdlib_corpus(max_bytes=max_bytes) + shakespeare_corpus() + books_corpus()
    if max_bytes is not None:
        sizes = itertools.accumulate(len(text) for _, text in docs)
        docs = [doc for doc, total in zip(docs, sizes) if total <= max_bytes]
    for i, (name, text) in enumerate(docs):
        (directory / f"{i:04d}-{name}.txt").write_text(text, encoding="utf-8")
    return directory


def run_demo(
    out: str | Path = "runs/demo",
    entropy_steps: int = ENTROPY_STEPS,
    blt_steps: int = BLT_STEPS,
    quiet: bool = False,
    corpus_bytes: int | None = CORPUS_BYTES,
    precision: str = "auto",
) -> dict:
    """The demo into `out`. `precision` as `blt train`'s, but for `auto`: bfloat16 autocast where this CPU
    multiplies bfloat16 matrices in hardware (the steps take about 15-25% less time), float32 elsewhere."""
    check_precision(precision)  # before the run folder is touched
    if precision == "auto":
        precision = "bf16" if cpu_has_bf16_units() else "fp32"
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    start = time.time()
    out = Path(out)
    if out.exists() and is_ours(out, "demo"):
        say(f"replacing the previous demo run in {out}")
    claim(out, "demo", "blt demo", replace=True)  # refuses any folder the demo did not make
    corpus = write_corpus(out / "corpus", corpus_bytes)
    docs = read_documents([corpus])
    train_docs, val_docs = split_documents(docs)
    say(
        "corpus: the standard library's help topics, docstrings and comments, Shakespeare's plays and four "
        "public-domain books, "
        f"{sum(len(d.data) for d in docs) / 1e3:.0f} KB in {len(docs)} sections "
        f"({len(val_docs)} held out for validation)"
    )
    say(
        "training in "
        + ("bfloat16 autocast (float32 weights)" if precision == "bf16" else "float32")
        + f", {torch.get_num_threads()} threads"
    )

    say("\n[1/3] training the entropy model (a small byte LM)")
    ent = train_entropy(
        [str(corpus)],
        out / "entropy",
        preset="demo",
        max_steps=entropy_steps,
        device="cpu",
        progress=not quiet,
        precision=precision,
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
        precision=precision,
    )

    say("\n[3/3] sampling and drawing patches")
    model = load_blt(out / "blt")
    sample = model.generate([SAMPLE_PROMPT], max_new_bytes=160, temperature=0.7, top_k=20, seed=0)[0]
    greedy = model.generate([SAMPLE_PROMPT], max_new_bytes=100)[0]

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
    for label, text in (("sample (temperature 0.7, top-k 20)", sample), ("greedy", greedy)):
        say(f"{label}  {SAMPLE_PROMPT!r} ->")
        say("        " + (SAMPLE_PROMPT + text.decode("utf-8", errors="replace")).replace("\n", "\n        "))
    say(f"written  {out}/entropy/  {out}/blt/  {out}/patches.html  {out}/patches.png  {out}/loss.png")
    say(f"done in {minutes:.1f} minutes")
    return {
        "bpb": res["bpb"],
        "entropy_bpb": ent["bpb"],
        "unigram_bpb": unigram,
        "mean_patch_bytes": res["mean_patch_bytes"],
        "sample": sample,
        "greedy": greedy,
        "minutes": minutes,
    }


if __name__ == "__main__":
    run_demo()
    sys.exit(0)
