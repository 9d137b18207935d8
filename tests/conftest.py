import os
from pathlib import Path

import pytest
import torch

import blt
from blt.config import BLTConfig, EntropyModelConfig, PatchingConfig

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
SHARED_DATA = SHARED / "data"

TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity. Ça va? Grüße aus Köln! "
    "1234567890 -- éàü 漢字 テスト 🙂 done.\n"
)


def shared_path(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared corpora live in ../shared, next to the project)")
    return path


def tiny_entropy_config(**overrides) -> EntropyModelConfig:
    base = dict(dim=32, n_layers=2, n_heads=4, ffn_dim=64, sliding_window=16, max_seqlen=512)
    base.update(overrides)
    return EntropyModelConfig(**base)


def tiny_config(**overrides) -> BLTConfig:
    base = dict(
        dim_local_encoder=32, n_layers_local_encoder=1, n_heads_local_encoder=4,
        dim_global=64, n_layers_global=2, n_heads_global=4,
        dim_local_decoder=32, n_layers_local_decoder=2, n_heads_local_decoder=4,
        ffn_dim_local_encoder=64, ffn_dim_global=128, ffn_dim_local_decoder=64,
        local_attention_window_len=16, cross_attn_k=2, cross_attn_nheads=4,
        encoder_hash_byte_group_size=[3, 4, 5], encoder_hash_byte_group_vocab=101,
        encoder_hash_byte_group_nb_functions=2, max_seqlen=512, max_encoder_seq_length=2048,
        patching=PatchingConfig(mode="static", patch_size=4),
    )
    base.update(overrides)
    return BLTConfig(**base)


def random_entropy_model(seed: int = 0, **overrides) -> blt.EntropyModel:
    torch.manual_seed(seed)
    model = blt.EntropyModel(tiny_entropy_config(**overrides))
    from blt.model import init_weights

    init_weights(model)
    # sharpen the random LM so entropies vary along a text (a flat LM gives ~ln 260 everywhere)
    with torch.no_grad():
        model.output.weight.mul_(12.0)
    return model.eval()


def median_threshold(entropy_model, ids: torch.Tensor) -> float:
    """A threshold near the median entropy of `ids`, halfway between two neighbouring entropies, so
    that no entropy sits within float noise of it (two implementations then decide alike)."""
    values = entropy_model.entropies(ids).flatten().sort().values
    middle = len(values) // 2
    upper = min(len(values), middle + 50)
    i = middle + int((values[middle + 1 : upper] - values[middle : upper - 1]).argmax())
    return float((values[i] + values[i + 1]) / 2)


@pytest.fixture
def text_ids():
    return blt.encode(TEXT)[None]
