"""Our layout: config.json {"model_type": "blt_lm", ...} + model.safetensors; the entropy model in entropy_model/
(config.json {"model_type": "blt_lm_entropy", ...} + model.safetensors); bpe_tokenizer.json for the `bpe` patcher."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from safetensors.torch import save_file

from blt.config import BLTConfig, EntropyModelConfig, PatchingConfig, save_json
from blt.model.blt import BLT
from blt.model.entropy_model import EntropyModel
from blt.weights.files import read_json

MODEL_TYPE, ENTROPY_MODEL_TYPE = "blt_lm", "blt_lm_entropy"
WEIGHTS = "model.safetensors"
ENTROPY_DIR = "entropy_model"
BPE_TOKENIZER = "bpe_tokenizer.json"


def save_entropy_model(model: EntropyModel, path: str | Path, state_dict: dict | None = None) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_json({"model_type": ENTROPY_MODEL_TYPE, **model.config.to_dict()}, path / "config.json")
    _save_weights(model.state_dict() if state_dict is None else state_dict, path / WEIGHTS)


def _save_weights(state_dict: dict, path: Path) -> None:
    save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, str(path))


def patching_of(model: BLT) -> PatchingConfig:
    """The patching the model actually uses: its patcher's settings win over the config's."""
    p, c = model.patcher, model.config.patching
    if p is None:
        return c
    return PatchingConfig(
        mode=p.mode,
        patch_size=getattr(p, "patch_size", c.patch_size),
        threshold=getattr(p, "threshold", c.threshold if p.mode == "entropy" else None),
        threshold_add=getattr(p, "threshold_add", None),
        monotonicity=getattr(p, "monotonicity", False),
        max_patch_length=p.max_patch_length,
    )


def save_blt(model: BLT, path: str | Path, state_dict: dict | None = None) -> None:
    """`state_dict` (default: the model's own) is what a sharded model's ranks gathered: its weights whole."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(model.config, patching=patching_of(model))
    save_json({"model_type": MODEL_TYPE, **config.to_dict()}, path / "config.json")
    _save_weights(model.state_dict() if state_dict is None else state_dict, path / WEIGHTS)
    if model.entropy_model is not None:
        save_entropy_model(model.entropy_model, path / ENTROPY_DIR)
    tokenizer = getattr(model.patcher, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save(str(path / BPE_TOKENIZER))


def read_config(path: Path) -> BLTConfig | EntropyModelConfig:
    """The config in `path`/config.json: a BLTConfig, or an EntropyModelConfig for an entropy model."""
    cfg = read_json(path / "config.json")
    kind = cfg.pop("model_type", None)
    return (EntropyModelConfig if kind == ENTROPY_MODEL_TYPE else BLTConfig).from_dict(cfg)
