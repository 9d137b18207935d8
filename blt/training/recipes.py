"""End-to-end jobs behind the CLI: train the entropy model, train BLT, evaluate a model.

Each takes raw text paths and a run directory, and leaves a model `load_pretrained` can read.
"""

from __future__ import annotations

import json
import lzma
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from blt.bpe import encode_with_delimiters, load_bpe, train_bpe
from blt.config import BLTConfig, EntropyModelConfig, PatchingConfig, save_json
from blt.errors import BltError
from blt.flops import entropy_model_flops, flops_per_byte
from blt.model.blt import init_weights
from blt.model.patching import build_patcher, threshold_for_mean_patch
from blt.presets import blt_preset, entropy_preset
from blt.training.checkpoints import latest_checkpoint
from blt.training.data import (
    PackedSequences,
    build_stream,
    cached_entropies,
    count_bytes,
    read_documents,
    split_documents,
)
from blt.training.distributed import setup_distributed
from blt.training.evaluate import evaluate_stream, patch_starts_for, unigram_bpb
from blt.training.loop import TrainConfig, lm_loss, log_metrics, train_loop
from blt.weights import BLT, EntropyModel, load_entropy_model, load_pretrained

DEFAULT_CACHE = Path.home() / ".cache" / "blt"
BEST = "best"  # beside the final model: the weights of the best validation point
# Above this many trainable parameters per training byte a model can memorize its corpus. (The compute-optimal
# recipe the paper builds on spends ~20 tokens, about 90 bytes, per parameter: 0.01 parameters per byte.)
MAX_PARAMS_PER_BYTE = 1.0


def _prepare_run_dir(out: Path, resume: bool) -> dict | None:
    """The saved run description when resuming; refuse to overwrite an existing run otherwise."""
    run_file = out / "run.json"
    if resume:
        if not run_file.is_file() or latest_checkpoint(out) is None:
            raise BltError(f"{out} holds no checkpoint to resume from")
        return json.loads(run_file.read_text())
    if run_file.exists() or (out / "checkpoints").exists():
        raise BltError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    return None


def _run_settings(out: Path, resume: bool, preset, config_cls, overrides: dict):
    """(saved run description or None, model config, training config): a resumed run keeps its own."""
    saved = _prepare_run_dir(out, resume)
    if saved:
        return saved, config_cls.from_dict(saved["model"]), TrainConfig(**saved["train"])
    config, hyper = preset()
    return None, config, _train_config(hyper, overrides)


def _train_config(hyper, overrides: dict) -> TrainConfig:
    base = TrainConfig(
        seq_len=hyper.seq_len,
        batch_size=hyper.batch_size,
        lr=hyper.lr,
        warmup_steps=hyper.warmup_steps,
        max_steps=hyper.max_steps,
    )
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def log_final(out: Path, result: dict) -> None:
    """The full validation of the final model, logged at the last step."""
    records = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    step = max((json.loads(r).get("step", 0) for r in records if r), default=0)
    log_metrics(out, {"step": step, "final": True, **{f"val_{k}": v for k, v in result.items()}})


def warn_if_large(model: torch.nn.Module, train_bytes: int, what: str) -> float:
    """One line on stderr when `model` has more than MAX_PARAMS_PER_BYTE parameters per training byte."""
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ratio = params / max(train_bytes, 1)
    if ratio > MAX_PARAMS_PER_BYTE:
        print(
            f"warning: the {what} has {params / 1e6:.2f}M parameters for {train_bytes / 1e3:.0f} KB of training text "
            f"({ratio:.1f} per byte, above {MAX_PARAMS_PER_BYTE:g}): it can memorize the corpus; use a smaller preset "
            "or more data (best/ keeps the best validation point, --patience stops early)",
            file=sys.stderr,
        )
    return ratio


def save_best(out: Path):
    """`on_best` for the training loop: the model of each new best validation point goes to `out`/best."""

    def on_best(model, record: dict) -> None:
        was_training = model.training
        model.eval()
        model.save_pretrained(out / BEST)
        save_json({"step": record["step"], "val_bpb": record["bpb"]}, out / BEST / "best.json")
        model.train(was_training)

    return on_best


def resolve_model_dir(path: str | Path, final: bool = False) -> Path:
    """A run folder's best/ model when it has one (unless `final`), else the folder itself."""
    path = Path(path)
    best = path / BEST
    return path if final or not (best / "config.json").is_file() else best


def xz_bpb(data: bytes) -> float:
    """Bits per byte of `xz -9` (LZMA, the xz container) on `data`: the general-purpose compressor to beat."""
    return 8 * len(lzma.compress(data, preset=9)) / max(len(data), 1)


def lm_forward(model, batch) -> torch.Tensor:
    """Training loss of an LM over ids (the entropy model, the byte and token baselines)."""
    return lm_loss(model(batch["ids"]), batch["targets"])


def blt_forward(patcher):
    """Training loss of a BLT whose patches come from `patcher` (or from the batch's cached entropies)."""

    def forward(model, batch):
        starts = patch_starts_for(patcher, batch["ids"], batch.get("entropies"))
        return lm_loss(model(batch["ids"], patch_starts=starts), batch["targets"])

    return forward


# ---- entropy model ---------------------------------------------------------------------------
def train_entropy(
    data: list[str],
    out: str | Path,
    preset: str = "demo",
    resume: bool = False,
    val_fraction: float = 0.1,
    split: str = "auto",
    device: str | None = None,
    progress: bool = True,
    **overrides,
) -> dict:
    out = Path(out)
    d = setup_distributed(device)
    saved, config, cfg = _run_settings(out, resume, lambda: entropy_preset(preset), EntropyModelConfig, overrides)
    if saved:
        data, val_fraction, split = saved["data"], saved["val_fraction"], saved["split"]
    train_docs, val_docs = split_documents(read_documents(data), val_fraction, split)
    train_stream, val_stream = build_stream(train_docs), build_stream(val_docs)
    seqs = PackedSequences(train_stream, cfg.seq_len)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        if not saved:
            save_json(
                {
                    "kind": "entropy_model",
                    "model": config.to_dict(),
                    "train": asdict(cfg),
                    "data": list(map(str, data)),
                    "val_fraction": val_fraction,
                    "split": split,
                },
                out / "run.json",
            )
    torch.manual_seed(cfg.seed)
    model = EntropyModel(config)
    init_weights(model)

    def validate(m):
        return (
            evaluate_stream(m, val_stream, cfg.seq_len, entropies=None, max_windows=cfg.eval_windows)
            if len(val_stream) > 1
            else {"bpb": float("nan")}
        )

    if d.main:
        warn_if_large(model, count_bytes(train_stream), "entropy model")
    train_loop(model, seqs, cfg, out, lm_forward, validate, resume, d, progress, on_best=save_best(out))
    result = {}
    if d.main:
        model.eval()
        model.save_pretrained(out)
        if len(val_stream) > 1:
            result = evaluate_stream(model, val_stream, cfg.seq_len)
            result["unigram_bpb"] = unigram_bpb(train_stream, val_stream)
            log_final(out, result)
        save_json(result, out / "summary.json")
    return result


# ---- BLT ------------------------------------------------------------------------------------------
def train_blt(
    data: list[str],
    out: str | Path,
    entropy_model: str | Path | None = None,
    patching: str = "entropy",
    target_patch_bytes: float = 4.5,
    threshold: float | None = None,
    preset: str = "demo",
    resume: bool = False,
    val_fraction: float = 0.1,
    split: str = "auto",
    bpe_vocab: int = 1024,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
    **overrides,
) -> dict:
    out = Path(out)
    d = setup_distributed(device)
    saved, config, cfg = _run_settings(out, resume, lambda: blt_preset(preset), BLTConfig, overrides)
    if saved:
        data, val_fraction, split, entropy_model = (
            saved["data"],
            saved["val_fraction"],
            saved["split"],
            saved["entropy_model"],
        )
        patching = config.patching.mode
    if patching == "entropy" and entropy_model is None:
        raise BltError("entropy patching needs --entropy-model (train one with `blt train-entropy`)")
    cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE

    # data: the bpe patcher needs a tokenizer trained on the training split, and delimiters in the stream
    train_docs, val_docs = split_documents(read_documents(data), val_fraction, split)
    tokenizer = None
    if patching == "bpe":
        tokenizer = (
            load_bpe(out / "bpe_tokenizer.json") if saved else train_bpe((doc.data for doc in train_docs), bpe_vocab)
        )
        encode_doc = lambda data: encode_with_delimiters(tokenizer, data)  # noqa: E731
    else:
        encode_doc = None
    train_stream, val_stream = build_stream(train_docs, encode_doc), build_stream(val_docs, encode_doc)

    em = load_entropy_model(entropy_model) if patching == "entropy" else None
    train_ent = val_ent = None
    if em is not None:
        em.to(d.device)
        train_ent = cached_entropies(em, train_stream, cache_dir, progress=progress and d.main)
        val_ent = cached_entropies(em, val_stream, cache_dir, progress=progress and d.main) if len(val_stream) else None
    if not saved:
        if patching == "entropy" and threshold is None:
            rows = [
                torch.from_numpy(np.array(train_ent[s : s + cfg.seq_len]))
                for s in range(0, min(len(train_ent), 512 * cfg.seq_len), cfg.seq_len)
            ]
            threshold = threshold_for_mean_patch(rows, target_patch_bytes)
        config = replace(
            config,
            patching=PatchingConfig(
                mode=patching,
                patch_size=round(target_patch_bytes) if patching == "static" else target_patch_bytes,
                threshold=threshold if patching == "entropy" else None,
            ),
        )
    patcher = build_patcher(config.patching, em, tokenizer)
    torch.manual_seed(cfg.seed)
    model = BLT(config, patcher=patcher)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        if not saved:
            save_json(
                {
                    "kind": "blt",
                    "model": config.to_dict(),
                    "train": asdict(cfg),
                    "data": list(map(str, data)),
                    "val_fraction": val_fraction,
                    "split": split,
                    "entropy_model": str(entropy_model) if entropy_model else None,
                },
                out / "run.json",
            )
            if tokenizer is not None:
                tokenizer.save(str(out / "bpe_tokenizer.json"))

    seqs = PackedSequences(train_stream, cfg.seq_len, train_ent)

    def validate(m):
        return (
            evaluate_stream(m, val_stream, cfg.seq_len, entropies=val_ent, max_windows=cfg.eval_windows)
            if len(val_stream) > 1
            else {"bpb": float("nan")}
        )

    if d.main:
        warn_if_large(model, count_bytes(train_stream), "BLT")
    train_loop(model, seqs, cfg, out, blt_forward(patcher), validate, resume, d, progress, on_best=save_best(out))
    result = {}
    if d.main:
        model.eval()
        model.save_pretrained(out)
        if len(val_stream) > 1:
            result = evaluate_stream(model, val_stream, cfg.seq_len, entropies=val_ent)
            result["unigram_bpb"] = unigram_bpb(train_stream, val_stream)
            log_final(out, result)
        result["threshold"] = config.patching.threshold
        result["params"] = model.num_params()
        save_json(result, out / "summary.json")
    return result


# ---- evaluation -------------------------------------------------------------------------------
def evaluate_model(
    model_dir: str | Path,
    data: list[str],
    split: str = "all",
    val_fraction: float = 0.1,
    seq_len: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """bpb, mean patch size and FLOPs per byte of a saved model on `data` (or on its train/val split), and the bpb of
    `xz -9` on the same bytes."""
    model = load_pretrained(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    docs = read_documents(data)
    if split in ("train", "val"):
        train_docs, val_docs = split_documents(docs, val_fraction, "auto")
        docs = train_docs if split == "train" else val_docs
    elif split != "all":
        raise BltError(f"unknown split {split!r}; use all, train or val")
    is_blt = isinstance(model, BLT)
    encode_doc = model.patcher.encode if is_blt and model.patcher is not None and model.patcher.mode == "bpe" else None
    stream = build_stream(docs, (lambda data: encode_doc(data).tolist()) if encode_doc else None)
    run = Path(model_dir) / "run.json"
    if not run.is_file() and Path(model_dir).name == BEST:
        run = Path(model_dir).parent / "run.json"
    if seq_len is None:
        seq_len = json.loads(run.read_text())["train"]["seq_len"] if run.is_file() else 1024
    ent = None
    if is_blt and model.entropy_model is not None:
        ent = cached_entropies(
            model.entropy_model, stream, Path(cache_dir) if cache_dir else DEFAULT_CACHE, progress=progress
        )
    result = evaluate_stream(model, stream, seq_len, batch_size=batch_size, entropies=ent)
    if is_blt:
        report = flops_per_byte(
            model.config,
            seq_len,
            result.get("mean_patch_bytes", 1.0),
            model.entropy_model.config if model.entropy_model else None,
        )
    else:
        fwd = entropy_model_flops(model.config, seq_len)
        report = {"inference_total": fwd, "training_total": 3 * fwd}
    result["flops_per_byte"] = report["inference_total"]
    result["train_flops_per_byte"] = report["training_total"]
    result["n_bytes_data"] = count_bytes(stream)
    result["xz_bpb"] = xz_bpb(b"".join(doc.data for doc in docs))
    return result
