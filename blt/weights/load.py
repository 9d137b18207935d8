"""Loading any supported layout, and converting between them.

Formats read (a directory path; nothing is ever downloaded): ours (`blt.weights.ours`), transformers'
(`blt.weights.hf`), the release's hub-mixin and consolidated layouts (`blt.weights.release`). Loading is strict:
every tensor in the file is used, every parameter is filled, shapes are checked.

`load_blt` returns a BLT with its patcher (and entropy model) attached, `load_entropy_model` an entropy model;
`load_pretrained` is the one entry that looks at the directory and calls either.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from blt.bpe import load_bpe
from blt.errors import BltError
from blt.model.entropy_model import EntropyModel as EntropyNetwork
from blt.model.patching import build_patcher
from blt.rundir import claim
from blt.weights import hf, ours, release
from blt.weights.files import check_file_holds, fill, read_json, read_safetensors
from blt.weights.hub import resolve
from blt.weights.pretrained import BLT, EntropyModel

OURS, OURS_ENTROPY, HF, RELEASE_HUB, RELEASE_CONSOLIDATED = (
    "ours",
    "ours-entropy",
    "transformers",
    "release-hub",
    "release-consolidated",
)


def detect_format(path: Path) -> str:
    if not path.exists():
        raise BltError(f"{path} does not exist")
    if not path.is_dir():
        raise BltError(f"{path} is not a directory (a model is a directory with config.json + model.safetensors)")
    if (path / "config.json").is_file():
        cfg = read_json(path / "config.json")
        if cfg.get("model_type") == ours.MODEL_TYPE:
            return OURS
        if cfg.get("model_type") == ours.ENTROPY_MODEL_TYPE:
            return OURS_ENTROPY
        if cfg.get("model_type") == "blt":
            return HF
        if isinstance(cfg.get("args"), dict):
            return RELEASE_HUB
        raise BltError(f"{path / 'config.json'} is not a BLT config (model_type={cfg.get('model_type')!r})")
    if (path / "params.json").is_file():
        return RELEASE_CONSOLIDATED
    raise BltError(f"{path} is not a model directory: no config.json or params.json in it")


def holds_entropy_model(path: Path, fmt: str) -> bool:
    """Does the directory hold an entropy model alone (not a BLT)?"""
    return fmt == OURS_ENTROPY or (fmt in (RELEASE_HUB, RELEASE_CONSOLIDATED) and release.is_entropy_model(path))


# ---- building models from each layout --------------------------------------------------------------
def _build(cls, config, weights: Path):
    """`cls(config)`, once a meta-device build has shown the weights file can hold that many parameters."""
    with torch.device("meta"):
        n_params = sum(p.numel() for p in cls(config).parameters())
    check_file_holds(n_params, weights)
    return cls(config)


def _config(read, path: Path):
    """A config read by `read`; a missing or mistyped key is one line naming the file."""
    try:
        return read()
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        if isinstance(e, BltError):
            raise
        raise BltError(f"{path}: missing or invalid config entry {e}") from None


def _ours(path: Path) -> tuple[BLT, EntropyModel | None]:
    model = _build(BLT, ours.read_config(path), path / ours.WEIGHTS)
    fill(model, read_safetensors(path / ours.WEIGHTS), {k: k for k in model.state_dict()}, path / ours.WEIGHTS)
    entropy = _ours_entropy(path / ours.ENTROPY_DIR) if (path / ours.ENTROPY_DIR).is_dir() else None
    return model, entropy


def _ours_entropy(path: Path) -> EntropyModel:
    model = _build(EntropyModel, ours.read_config(path), path / ours.WEIGHTS)
    fill(model, read_safetensors(path / ours.WEIGHTS), {k: k for k in model.state_dict()}, path / ours.WEIGHTS)
    return model


def _hf(path: Path) -> tuple[BLT, EntropyModel | None]:
    raw = read_json(path / "config.json")
    config, entropy_config = _config(lambda: hf.config_from_hf(raw), path / "config.json")
    source = path / "model.safetensors"
    with torch.device("meta"):
        check_file_holds(sum(p.numel() for p in BLT(config).parameters()), source)
    tensors = read_safetensors(source)
    hf.split_fused_hash_tables(tensors, config, source)
    model = BLT(config)
    inner = {k: v for k, v in tensors.items() if k.startswith(hf.PATCHER_PREFIX)}
    entropy = None
    if entropy_config is not None and inner:
        entropy = EntropyModel(entropy_config)
        fill(entropy, inner, hf.hf_names(entropy, entropy=True), source)
    fill(model, {k: v for k, v in tensors.items() if k not in inner}, hf.hf_names(model), source)
    return model, entropy


def _release(path: Path) -> tuple[BLT, EntropyModel | None]:
    config, tensors, source = _config(lambda: release.read_blt(path), path)
    model = _build(BLT, config, source)
    fill(model, tensors, {k: release.release_name(k) for k in model.state_dict()}, source)
    entropy_dir = release.entropy_dir_of(path)
    return model, _release_entropy(entropy_dir) if entropy_dir is not None else None


def _release_entropy(path: Path) -> EntropyModel:
    config, tensors, source = _config(lambda: release.read_entropy_model(path), path)
    model = _build(EntropyModel, config, source)
    fill(model, tensors, {k: release.release_name(k) for k in model.state_dict()}, source)
    return model


# ---- public entry points --------------------------------------------------------------------------
def load_entropy_model(path: str | os.PathLike, device=None, dtype=None) -> EntropyModel:
    """An entropy model from its own directory (or Hub repo id), or the one a BLT directory carries."""
    path = resolve(path)
    fmt = detect_format(path)
    if fmt == OURS_ENTROPY:
        model = _ours_entropy(path)
    elif holds_entropy_model(path, fmt):
        model = _release_entropy(path)
    else:
        model = load_blt(path).entropy_model
        if model is None:
            raise BltError(f"{path} is a BLT without an entropy model; pass an entropy model directory")
    return model.to(device=device, dtype=dtype).eval()


def load_blt(
    path: str | os.PathLike, entropy_model: str | os.PathLike | EntropyNetwork | None = None, device=None, dtype=None
) -> BLT:
    """A BLT with its patcher attached (and the entropy model found beside the weights, or `entropy_model`:
    a directory, a Hub repo id or a model). `path` is a directory or a Hub repo id ("owner/name[@rev]")."""
    path = resolve(path)
    fmt = detect_format(path)
    if holds_entropy_model(path, fmt):
        raise BltError(f"{path} holds an entropy model, not a BLT")
    model, found = {OURS: _ours, HF: _hf}.get(fmt, _release)(path)
    if entropy_model is not None and not isinstance(entropy_model, EntropyNetwork):
        entropy_model = resolve(entropy_model)
    if entropy_model is not None:
        found = entropy_model if isinstance(entropy_model, EntropyNetwork) else load_entropy_model(entropy_model)
    tokenizer = _tokenizer(path / ours.BPE_TOKENIZER) if (path / ours.BPE_TOKENIZER).is_file() else None
    model.patcher = build_patcher(model.config.patching, found, tokenizer)
    return model.to(device=device, dtype=dtype).eval()


def _tokenizer(path: Path):
    try:
        return load_bpe(path)
    except Exception as e:  # the tokenizers library raises its own exception types on a bad file
        raise BltError(f"{path} is not a readable BPE tokenizer: {str(e).splitlines()[0] if str(e) else e!r}") from None


def load_pretrained(
    path: str | os.PathLike, entropy_model: str | os.PathLike | EntropyNetwork | None = None, device=None, dtype=None
) -> BLT | EntropyModel:
    """A BLT (`load_blt`) or, when the directory holds one alone, an entropy model (`load_entropy_model`).
    `path` is a directory or a Hub repo id ("owner/name[@rev]"); a local path always wins."""
    path = resolve(path)
    if holds_entropy_model(path, detect_format(path)):
        return load_entropy_model(path, device=device, dtype=dtype)
    return load_blt(path, entropy_model=entropy_model, device=device, dtype=dtype)


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str = "ours", entropy_model=None) -> None:
    """Convert a model directory (any readable format) to ours or to transformers' layout."""
    if to not in ("ours", "hf"):
        raise BltError(f"unknown target format {to!r}; use 'ours' or 'hf'")
    model = load_pretrained(src, entropy_model=entropy_model)
    claim(Path(dst), "model", "blt convert")  # a folder convert did not make is refused, untouched
    if isinstance(model, EntropyNetwork):
        if to != "ours":
            raise BltError("an entropy model alone can only be converted to our format")
        model.save_pretrained(dst)
    elif to == "ours":
        model.save_pretrained(dst)
    else:
        hf.save_hf(model, dst)
