"""Named model sizes with training hyperparameters that suit them.

`tiny` is for tests, `demo` for `blt demo` on two CPU cores, `small` (about 20M parameters) for a
single GPU or a patient CPU, `blt-1b` is the released 1B shape.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from blt.config import BLTConfig, EntropyModelConfig, PatchingConfig
from blt.errors import BltError


@dataclass(frozen=True)
class Hyper:
    seq_len: int
    batch_size: int
    lr: float
    warmup_steps: int
    max_steps: int


ENTROPY_PRESETS: dict[str, tuple[EntropyModelConfig, Hyper]] = {
    "tiny": (
        EntropyModelConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, sliding_window=64, max_seqlen=1024),
        Hyper(128, 4, 3e-3, 5, 50),
    ),
    "demo": (
        EntropyModelConfig(dim=128, n_layers=2, n_heads=4, ffn_dim=384, sliding_window=256, max_seqlen=8192),
        Hyper(256, 16, 4e-3, 30, 300),
    ),
    "small": (
        EntropyModelConfig(dim=256, n_layers=4, n_heads=4, ffn_dim=768, sliding_window=512, max_seqlen=8192),
        Hyper(1024, 16, 2e-3, 200, 5000),
    ),
    "release": (EntropyModelConfig(), Hyper(8192, 2, 4e-4, 500, 100_000)),
}

_LOCAL = dict(
    local_attention_window_len=512,
    cross_attn_all_layers_decoder=True,
    cross_attn_all_layers_encoder=False,
    encoder_hash_byte_group_nb_functions=1,
)

BLT_PRESETS: dict[str, tuple[BLTConfig, Hyper]] = {
    "tiny": (
        BLTConfig(
            dim_local_encoder=32,
            n_layers_local_encoder=1,
            n_heads_local_encoder=2,
            dim_global=64,
            n_layers_global=1,
            n_heads_global=2,
            dim_local_decoder=32,
            n_layers_local_decoder=1,
            n_heads_local_decoder=2,
            cross_attn_k=2,
            cross_attn_nheads=2,
            ffn_dim_local_encoder=64,
            ffn_dim_global=128,
            ffn_dim_local_decoder=64,
            encoder_hash_byte_group_size=[3, 4],
            encoder_hash_byte_group_vocab=512,
            max_seqlen=1024,
            max_encoder_seq_length=4096,
            **_LOCAL,
        ),
        Hyper(128, 4, 3e-3, 5, 50),
    ),
    "demo": (
        BLTConfig(
            dim_local_encoder=128,
            n_layers_local_encoder=1,
            n_heads_local_encoder=4,
            dim_global=256,
            n_layers_global=3,
            n_heads_global=4,
            dim_local_decoder=128,
            n_layers_local_decoder=1,  # a second layer costs 40% more per step than it gives back in 2 minutes
            n_heads_local_decoder=4,
            cross_attn_k=2,
            cross_attn_nheads=4,
            ffn_dim_local_encoder=384,
            ffn_dim_global=768,
            ffn_dim_local_decoder=384,
            encoder_hash_byte_group_size=[3, 4, 5],  # sized to a 2 MB corpus: larger tables memorize it
            encoder_hash_byte_group_vocab=4096,
            max_seqlen=2048,
            max_encoder_seq_length=8192,
            **_LOCAL,
        ),
        Hyper(512, 8, 1e-2, 30, 600),
    ),
    "small": (
        BLTConfig(
            dim_local_encoder=256,
            n_layers_local_encoder=1,
            n_heads_local_encoder=4,
            dim_global=512,
            n_layers_global=6,
            n_heads_global=8,
            dim_local_decoder=256,
            n_layers_local_decoder=3,
            n_heads_local_decoder=4,
            cross_attn_k=2,
            cross_attn_nheads=4,
            ffn_dim_local_encoder=768,
            ffn_dim_global=1536,
            ffn_dim_local_decoder=768,
            encoder_hash_byte_group_size=[3, 4, 5, 6, 7, 8],
            encoder_hash_byte_group_vocab=16384,
            max_seqlen=4096,
            max_encoder_seq_length=16384,
            **_LOCAL,
        ),
        Hyper(2048, 8, 1e-3, 200, 10_000),
    ),
    "blt-1b": (BLTConfig(), Hyper(16384, 4, 4e-4, 2000, 240_000)),
}


def entropy_preset(name: str) -> tuple[EntropyModelConfig, Hyper]:
    if name not in ENTROPY_PRESETS:
        raise BltError(f"unknown entropy-model preset {name!r}; choose from {', '.join(ENTROPY_PRESETS)}")
    return ENTROPY_PRESETS[name]


def blt_preset(name: str, patching: PatchingConfig | None = None) -> tuple[BLTConfig, Hyper]:
    if name not in BLT_PRESETS:
        raise BltError(f"unknown BLT preset {name!r}; choose from {', '.join(BLT_PRESETS)}")
    config, hyper = BLT_PRESETS[name]
    return (replace(config, patching=patching) if patching is not None else config), hyper
