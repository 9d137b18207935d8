"""End-to-end jobs behind the CLI: train the entropy model, train BLT, evaluate a model.

Each takes raw text paths and a run directory, and leaves a model `load_pretrained` can read.
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from blt.bpe import encode_with_delimiters, load_bpe, train_bpe
from blt.config import BLTConfig, EntropyModelConfig, PatchingConfig, save_json
from blt.errors import BltError
from blt.flops import entropy_model_flops, flops_per_byte
from blt.memory import available_cpu_bytes, blt_stacks, blt_units, device_bytes, entropy_units, gib
from blt.model.blt import init_weights
from blt.model.patching import build_patcher, threshold_for_mean_patch
from blt.presets import blt_preset, entropy_preset
from blt.rundir import TMP_PREFIX, adopt, claim, clean_temporaries, empty_folder, lock, marker
from blt.training.checkpoints import latest_checkpoint, load_weights, usable_checkpoint
from blt.training.data import (
    PackedSequences,
    build_stream,
    cached_entropies,
    count_bytes,
    entropy_model_digest,
    read_documents,
    split_documents,
)
from blt.training.distributed import setup_distributed
from blt.training.evaluate import evaluate_stream, patch_starts_for, unigram_bpb
from blt.training.loop import TrainConfig, computes_in_bf16, lm_loss, log_metrics, train_loop
from blt.training.parallel import full_state_dict, is_sharded
from blt.weights import BLT, EntropyModel, load_entropy_model, load_pretrained

DEFAULT_CACHE = Path.home() / ".cache" / "blt"
BEST = "best"  # beside the final model: the weights of the best validation point
# Above this many trainable parameters per training byte a model can memorize its corpus. (The compute-optimal
# recipe the paper builds on spends ~20 tokens, about 90 bytes, per parameter: 0.01 parameters per byte.)
MAX_PARAMS_PER_BYTE = 1.0


RESUMABLE = (
    "max_steps",
    "max_minutes",
    "eval_every",
    "ckpt_every",
    "log_every",
    "patience",
    "parallel",
    "activation_checkpointing",
    "compile",
    "precision",
)  # a resumed run honours these


def _open_run(out: Path, kind: str, command: str, resume: bool, main: bool = True):
    """(saved run description or None, lock handle). The folder must be ours (or new, or empty); one
    training holds it at a time; a run that failed before its first checkpoint starts over."""
    if not main:
        return (_read_run(out) if resume else None), None
    if resume and (out / "run.json").is_file() and (out / "checkpoints").is_dir() and marker(out) is None:
        adopt(out, kind, command)  # a run written before folders carried markers
    claim(out, kind, command)
    handle = lock(out)
    clean_temporaries(out)
    has_checkpoint = latest_checkpoint(out) is not None
    if resume:
        if not (out / "run.json").is_file() or not has_checkpoint:
            handle.close()
            raise BltError(f"{out} holds no checkpoint to resume from")
        return _read_run(out), handle
    if has_checkpoint:
        handle.close()
        raise BltError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    empty_folder(out, kind)  # what a run that failed before its first checkpoint left behind
    return None, handle


def _read_run(out: Path) -> dict:
    try:
        saved = json.loads((out / "run.json").read_text())
        if not isinstance(saved, dict) or not isinstance(saved.get("train"), dict):
            raise ValueError("not a run description")
        return saved
    except (OSError, ValueError) as e:
        raise BltError(f"{out / 'run.json'} is unreadable or corrupt ({e}); the run cannot be resumed") from None


def _refuse_changes(out: Path, saved: dict, given: dict) -> None:
    """Refuse a resume whose settings (model, data stream) differ from the saved run's, naming each."""
    diffs = []
    for key, value in given.items():
        if value is None:
            continue
        before = saved["train"].get(key) if key in saved["train"] else saved.get(key)
        if before is None and key not in saved["train"] and key not in saved:
            continue  # a run written before this setting was recorded
        if before != value:
            diffs.append(f"{key} (saved {before!r}, given {value!r})")
    if diffs:
        raise BltError(f"--resume cannot change the run in {out}: " + "; ".join(diffs))


def _run_settings(out: Path, resume: bool, preset, config_cls, overrides: dict, saved: dict | None):
    """(model config, training config): a resumed run keeps its own, but for the flags it can honour."""
    if saved:
        fixed = {k: v for k, v in overrides.items() if k not in RESUMABLE}
        _refuse_changes(out, saved, fixed)
        cfg = TrainConfig(**saved["train"])
        cfg = replace(cfg, **{k: v for k, v in overrides.items() if k in RESUMABLE and v is not None})
        return config_cls.from_dict(saved["model"]), cfg
    config, hyper = preset()
    return config, _train_config(hyper, overrides)


def _check_memory(units: list[int], cfg: TrainConfig, stacks, vocab: int, d, force: bool) -> None:
    """Refuse, before allocating anything, a job whose estimated memory per device exceeds what the device has
    free (each rank computes batch/world sequences; FSDP holds 1/world of the model and its optimizer)."""
    cuda = d.device.type == "cuda"
    parts = device_bytes(
        units,
        stacks,
        vocab,
        cfg.seq_len,
        max(1, cfg.batch_size // d.world),
        d.world,
        cfg.parallel,
        bf16=computes_in_bf16(cfg.precision, d.device),
        activation_checkpointing=cfg.activation_checkpointing,
    )
    need = sum(parts.values())
    free = torch.cuda.mem_get_info(d.device)[0] if cuda else available_cpu_bytes()
    if free is not None and need > free and not force:
        raise BltError(
            f"this job needs about {gib(need)} per device ({sum(units) / 1e6:.0f}M parameters, batch "
            f"{cfg.batch_size} x {cfg.seq_len}, {cfg.parallel} over {d.world}) but {d.device.type} has {gib(free)} "
            "available; use a smaller preset/batch, more ranks with --parallel fsdp, or --force"
        )


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

    def on_best(model, record: dict, weights: dict) -> None:
        was_training = model.training
        model.eval()
        tmp = out / f"{TMP_PREFIX}{BEST}"  # written whole, then swapped in: best/ is never half a model
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.save_pretrained(tmp, state_dict=weights)
            save_json({"step": record["step"], "val_bpb": record["bpb"]}, tmp / "best.json")
            shutil.rmtree(out / BEST, ignore_errors=True)
            os.replace(tmp, out / BEST)
        except (OSError, SafetensorError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            cause = getattr(e, "strerror", None) or e
            raise BltError(
                f"could not write the best model to {out / BEST}: {cause}; the checkpoints are intact"
            ) from None
        model.train(was_training)

    return on_best


def resolve_model_dir(path: str | Path, final: bool = False) -> Path:
    """A run folder's best/ model when it has one (unless `final`), else the folder itself."""
    path = Path(path)
    best = path / BEST
    return path if final or not (best / "config.json").is_file() else best


def export_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Write the model of a training checkpoint as a `save_pretrained` folder, in one process, whatever world size
    wrote it and whichever kind it is (sharded or one file). `src` is a run folder (its newest complete
    checkpoint) or one checkpoint in it (RUN/checkpoints/step-N). Returns the checkpoint read."""
    src = Path(src)
    if (src / "checkpoints").is_dir():
        run, ckpt = src, usable_checkpoint(src)
    elif src.parent.name == "checkpoints" and (src / "trainer.pt").is_file():
        run, ckpt = src.parent.parent, src
    else:
        raise BltError(f"{src} is neither a run folder with checkpoints nor a checkpoint (RUN/checkpoints/step-N)")
    if ckpt is None:
        raise BltError(f"{src} holds no complete checkpoint")
    saved = _read_run(run)
    try:
        if saved.get("kind") == "entropy_model":
            model = EntropyModel(EntropyModelConfig.from_dict(saved["model"]))
        else:
            config = BLTConfig.from_dict(saved["model"])
            mode = config.patching.mode
            em = load_entropy_model(saved["entropy_model"]) if mode == "entropy" else None
            tokenizer = load_bpe(run / "bpe_tokenizer.json") if mode == "bpe" else None
            model = BLT(config, patcher=build_patcher(config.patching, em, tokenizer))
    except (KeyError, TypeError) as e:
        raise BltError(f"{run / 'run.json'} does not describe a model ({e})") from None
    load_weights(ckpt, model)
    claim(Path(dst), "model", "blt export")  # a folder export did not make is refused, untouched
    _write(lambda: model.eval().save_pretrained(dst), Path(dst))
    return ckpt


def xz_bpb(data: bytes) -> float:
    """Bits per byte of `xz -9` (LZMA, the xz container) on `data`: the general-purpose compressor to beat."""
    return 8 * len(lzma.compress(data, preset=9)) / max(len(data), 1)


def validator(val_stream, cfg: TrainConfig, entropies=None):
    """The loop's periodic validation: bpb over the first `cfg.eval_windows` windows of the held-out stream."""

    def validate(model) -> dict:
        if len(val_stream) <= 1:
            return {"bpb": float("nan")}
        return evaluate_stream(model, val_stream, cfg.seq_len, entropies=entropies, max_windows=cfg.eval_windows)

    return validate


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
    preset: str | None = None,
    resume: bool = False,
    val_fraction: float | None = None,
    split: str | None = None,
    device: str | None = None,
    progress: bool = True,
    force: bool = False,
    text_field: str | None = None,
    max_bytes: int | None = None,
    **overrides,
) -> dict:
    """Train an entropy model into run folder `out`. With `resume`, settings left None are the saved run's;
    flags a resumed run cannot honour (model, data stream) must equal the saved ones. `text_field` and `max_bytes`
    are `read_documents`'s (the column of Parquet files and datasets; a cap on the bytes read)."""
    out = Path(out)
    d = setup_distributed(device)
    saved, handle = _open_run(out, "entropy-run", "blt train-entropy", resume, d.main)
    if saved:
        given = dict(overrides, preset=preset, data=list(map(str, data)), val_fraction=val_fraction, split=split)
        given |= {"text_field": text_field, "max_bytes": max_bytes}
        _refuse_changes(out, saved, {k: v for k, v in given.items() if k not in RESUMABLE})
        data, val_fraction, split, preset = saved["data"], saved["val_fraction"], saved["split"], saved.get("preset")
        text_field, max_bytes = saved.get("text_field"), saved.get("max_bytes")
    preset, val_fraction, split = preset or "demo", 0.1 if val_fraction is None else val_fraction, split or "auto"
    config, cfg = _run_settings(out, resume, lambda: entropy_preset(preset), EntropyModelConfig, overrides, saved)
    stacks = [(cfg.seq_len, config.dim, config.hidden_dim, config.n_layers)]
    _check_memory(entropy_units(config), cfg, stacks, config.vocab_size, d, force)
    docs = read_documents(data, text_field or "text", max_bytes)
    train_docs, val_docs = split_documents(docs, val_fraction, split)
    train_stream, val_stream = build_stream(train_docs), build_stream(val_docs)
    seqs = PackedSequences(train_stream, cfg.seq_len)
    if d.main:
        record = {
            "kind": "entropy_model",
            "model": config.to_dict(),
            "train": asdict(cfg),
            "data": list(map(str, data)),
            "text_field": text_field or "text",
            "max_bytes": max_bytes,
            "val_fraction": val_fraction,
            "split": split,
            "preset": preset,
        }
        save_json(dict(saved, train=asdict(cfg)) if saved else record, out / "run.json")
    torch.manual_seed(cfg.seed)
    model = EntropyModel(config)
    init_weights(model)

    validate = validator(val_stream, cfg, None)

    if d.main:
        warn_if_large(model, count_bytes(train_stream), "entropy model")
    train_loop(model, seqs, cfg, out, lm_forward, validate, resume, d, progress, on_best=save_best(out))
    result = _final(
        model, out, d, lambda: evaluate_stream(model, val_stream, cfg.seq_len) if len(val_stream) > 1 else {}
    )
    if d.main:
        if result:
            result["unigram_bpb"] = unigram_bpb(train_stream, val_stream)
            log_final(out, result)
        save_json(result, out / "summary.json")
    if handle is not None:
        handle.close()
    return result


def _final(model, out: Path, d, evaluate) -> dict:
    """Write the trained model to `out` (rank 0) and validate it. A sharded model is gathered by every rank and
    validated by every rank (each forward pass gathers its blocks); a replicated one only by rank 0."""
    weights = full_state_dict(model)
    result = {}
    if d.main:
        model.eval()
        _write(lambda: model.save_pretrained(out, state_dict=weights), out)
    if d.main or is_sharded(model):
        result = evaluate()
    return result if d.main else {}


def _write(save, out: Path) -> None:
    """Run a writer of the final model; a full disk or a forbidden path is one line naming the folder."""
    try:
        save()
    except (OSError, SafetensorError) as e:
        cause = getattr(e, "strerror", None) or e
        raise BltError(f"could not write the model to {out}: {cause}; the checkpoints are intact") from None


# ---- BLT ------------------------------------------------------------------------------------------
def train_blt(
    data: list[str],
    out: str | Path,
    entropy_model: str | Path | None = None,
    patching: str | None = None,
    target_patch_bytes: float | None = None,
    threshold: float | None = None,
    preset: str | None = None,
    resume: bool = False,
    val_fraction: float | None = None,
    split: str | None = None,
    bpe_vocab: int | None = None,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
    force: bool = False,
    text_field: str | None = None,
    max_bytes: int | None = None,
    **overrides,
) -> dict:
    """Train a BLT into run folder `out`. With `resume`, settings left None are the saved run's; flags a
    resumed run cannot honour (model, patching, data stream, entropy model) must equal the saved ones.
    `text_field` and `max_bytes` are `read_documents`'s (the column of Parquet files and datasets; a byte cap)."""
    out = Path(out)
    d = setup_distributed(device)
    saved, handle = _open_run(out, "blt-run", "blt train", resume, d.main)
    if saved:
        given = dict(
            overrides,
            preset=preset,
            data=list(map(str, data)),
            val_fraction=val_fraction,
            split=split,
            patching=patching,
            target_patch_bytes=target_patch_bytes,
            threshold=threshold,
            bpe_vocab=bpe_vocab,
            text_field=text_field,
            max_bytes=max_bytes,
        )
        if "patching" not in saved:
            given["patching"] = None
            if patching is not None and patching != saved["model"]["patching"]["mode"]:
                raise BltError(
                    f"--resume cannot change the run in {out}: patching (saved "
                    f"{saved['model']['patching']['mode']!r}, given {patching!r})"
                )
        if threshold is not None and saved.get("threshold") is None:
            given["threshold"] = None  # the run calibrated its threshold: compare with the one it found
            if threshold != saved["model"]["patching"].get("threshold"):
                raise BltError(
                    f"--resume cannot change the run in {out}: threshold (calibrated "
                    f"{saved['model']['patching'].get('threshold')!r}, given {threshold!r})"
                )
        _refuse_changes(out, saved, {k: v for k, v in given.items() if k not in RESUMABLE})
        data, val_fraction, split = saved["data"], saved["val_fraction"], saved["split"]
        text_field, max_bytes = saved.get("text_field"), saved.get("max_bytes")
        entropy_model = entropy_model or saved["entropy_model"]
        preset = saved.get("preset")
        patching = saved["model"]["patching"]["mode"]
    preset, patching = preset or "demo", patching or "entropy"
    val_fraction, split = 0.1 if val_fraction is None else val_fraction, split or "auto"
    target_patch_bytes, bpe_vocab = target_patch_bytes or 4.5, bpe_vocab or 1024
    config, cfg = _run_settings(out, resume, lambda: blt_preset(preset), BLTConfig, overrides, saved)
    if patching == "entropy" and entropy_model is None:
        raise BltError("entropy patching needs --entropy-model (train one with `blt train-entropy`)")
    stacks = blt_stacks(config, cfg.seq_len, target_patch_bytes)
    _check_memory(blt_units(config), cfg, stacks, config.vocab_size, d, force)
    cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    if cache_dir.exists() and not cache_dir.is_dir():
        raise BltError(f"the cache folder {cache_dir} is a file")

    em = load_entropy_model(entropy_model) if patching == "entropy" else None
    em_digest = entropy_model_digest(em) if em is not None else None
    if saved and saved.get("entropy_model_digest") and em_digest != saved["entropy_model_digest"]:
        raise BltError(
            f"the entropy model {entropy_model} changed since the run in {out} started (weights hash "
            f"{em_digest}, the run used {saved['entropy_model_digest']}); resume with the original one"
        )

    # data: the bpe patcher needs a tokenizer trained on the training split, and delimiters in the stream
    train_docs, val_docs = split_documents(read_documents(data, text_field or "text", max_bytes), val_fraction, split)
    tokenizer = None
    if patching == "bpe":
        tokenizer = (
            load_bpe(out / "bpe_tokenizer.json") if saved else train_bpe((doc.data for doc in train_docs), bpe_vocab)
        )
        encode_doc = lambda data: encode_with_delimiters(tokenizer, data)  # noqa: E731
    else:
        encode_doc = None
    train_stream, val_stream = build_stream(train_docs, encode_doc), build_stream(val_docs, encode_doc)

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
            threshold_used = threshold_for_mean_patch(rows, target_patch_bytes)
        else:
            threshold_used = threshold
        config = replace(
            config,
            patching=PatchingConfig(
                mode=patching,
                patch_size=round(target_patch_bytes) if patching == "static" else target_patch_bytes,
                threshold=threshold_used if patching == "entropy" else None,
            ),
        )
    patcher = build_patcher(config.patching, em, tokenizer)
    torch.manual_seed(cfg.seed)
    model = BLT(config, patcher=patcher)
    if d.main:
        record = {
            "kind": "blt",
            "model": config.to_dict(),
            "train": asdict(cfg),
            "data": list(map(str, data)),
            "text_field": text_field or "text",
            "max_bytes": max_bytes,
            "val_fraction": val_fraction,
            "split": split,
            "entropy_model": str(entropy_model) if entropy_model else None,
            "entropy_model_digest": em_digest,
            "preset": preset,
            "patching": patching,
            "target_patch_bytes": target_patch_bytes,
            "threshold": threshold,
            "bpe_vocab": bpe_vocab,
        }
        save_json(dict(saved, train=asdict(cfg)) if saved else record, out / "run.json")
        if tokenizer is not None and not saved:
            tokenizer.save(str(out / "bpe_tokenizer.json"))

    seqs = PackedSequences(train_stream, cfg.seq_len, train_ent)

    validate = validator(val_stream, cfg, val_ent)

    if d.main:
        warn_if_large(model, count_bytes(train_stream), "BLT")
    train_loop(model, seqs, cfg, out, blt_forward(patcher), validate, resume, d, progress, on_best=save_best(out))
    result = _final(
        model,
        out,
        d,
        lambda: evaluate_stream(model, val_stream, cfg.seq_len, entropies=val_ent) if len(val_stream) > 1 else {},
    )
    if d.main:
        if result:
            result["unigram_bpb"] = unigram_bpb(train_stream, val_stream)
            log_final(out, result)
        result["threshold"] = config.patching.threshold
        result["params"] = model.num_params()
        save_json(result, out / "summary.json")
    if handle is not None:
        handle.close()
    return result


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_pos_int(x) -> bool:
    return _is_int(x) and x > 0


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
    text_field: str = "text",
    max_bytes: int | None = None,
    context: int = 0,
) -> dict:
    """bpb, mean patch size and FLOPs per byte of a saved model on `data` (or on its train/val split), and the bpb of
    `xz -9` on the same bytes. `text_field` and `max_bytes` are `read_documents`'s; `context` > 0 scores
    overlapping windows so that every prediction sees at least that many ids (`evaluate_stream`)."""
    model = load_pretrained(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    docs = read_documents(data, text_field, max_bytes)
    run_dir = Path(model_dir).parent if Path(model_dir).name == BEST else Path(model_dir)  # best/ sits in its run
    saved = _read_run(run_dir) if (run_dir / "run.json").is_file() else None
    if split in ("train", "val"):
        if saved is None:
            raise BltError(
                f"--split {split} needs the run's own split, but {model_dir} has no run.json; use --split all"
            )
        # the run's own split: its held-out share and mode, on the data given
        train_docs, val_docs = split_documents(docs, saved["val_fraction"], saved["split"])
        docs = train_docs if split == "train" else val_docs
        if not docs:
            raise BltError(f"the {split} side of the run's split of this data is empty")
    elif split != "all":
        raise BltError(f"unknown split {split!r}; use all, train or val")
    if not _is_pos_int(batch_size) or (seq_len is not None and not _is_pos_int(seq_len)):
        raise BltError(f"batch_size and seq_len must be positive integers, got {batch_size!r} and {seq_len!r}")
    is_blt = isinstance(model, BLT)
    encode_doc = model.patcher.encode if is_blt and model.patcher is not None and model.patcher.mode == "bpe" else None
    stream = build_stream(docs, (lambda data: encode_doc(data).tolist()) if encode_doc else None)
    limit = model.config.max_encoder_seq_length if is_blt else model.config.max_seqlen
    if seq_len is None:
        seq_len = saved["train"]["seq_len"] if saved else min(1024, limit)
    if seq_len > limit:
        raise BltError(f"--seq-len {seq_len} exceeds the model's longest sequence ({limit})")
    if not _is_int(context) or not 0 <= context < seq_len:
        raise BltError(f"--context must be an integer from 0 to the window length - 1 ({seq_len - 1}), got {context!r}")
    ent = None
    if is_blt and model.entropy_model is not None:
        ent = cached_entropies(
            model.entropy_model, stream, Path(cache_dir) if cache_dir else DEFAULT_CACHE, progress=progress
        )
    result = evaluate_stream(
        model, stream, seq_len, batch_size=batch_size, entropies=ent, context=context, progress=progress
    )
    result["seq_len"], result["context"] = seq_len, context
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
