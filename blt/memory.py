"""How much memory a training job will take, estimated from its config before anything is allocated.

float32 training with AdamW keeps four numbers per parameter (the weight, its gradient, two moments): 16
bytes. On top of that the backward pass needs the activations each layer saved, and the loss the logits
with their softmax and gradient. The estimate counts those; it is a floor (allocator slack, kernels'
workspaces and the data are not counted), so a job it refuses would surely not fit.
"""

from __future__ import annotations

import os

from blt.config import BLTConfig, EntropyModelConfig

BYTES_PER_PARAM = 16  # fp32 weight + gradient + AdamW's two moments


def block_params(dim: int, n_heads: int, n_kv_heads: int | None, ffn: int) -> int:
    """One transformer block: q, k, v, o projections (k, v narrower with grouped heads), SwiGLU, two RMSNorms."""
    kv = dim * (n_kv_heads or n_heads) // n_heads
    return 2 * dim * dim + 2 * dim * kv + 3 * dim * ffn + 2 * dim


def cross_params(dim: int) -> int:
    return 4 * dim * dim + 2 * dim


def blt_params(c: BLTConfig) -> int:
    """Parameters of a BLT, counted from its config without building it (the entropy model is not counted)."""
    ffn_e, ffn_g, ffn_d = c.ffn_dims
    de, dg, dd, k = c.dim_local_encoder, c.dim_global, c.dim_local_decoder, c.cross_attn_k
    hashes = c.encoder_hash_byte_group_nb_functions * len(c.encoder_hash_byte_group_size)
    encoder = (
        c.vocab_size * de
        + hashes * c.encoder_hash_byte_group_vocab * de
        + c.n_layers_local_encoder * block_params(de, c.n_heads_local_encoder, c.n_kv_heads, ffn_e)
        + de * k * de
        + (c.n_layers_local_encoder if c.cross_attn_all_layers_encoder else 1) * cross_params(de)
    )
    trunk = (k * de * dg if k * de != dg else 0) + c.n_layers_global * block_params(
        dg, c.n_heads_global, c.n_kv_heads_global, ffn_g
    )
    decoder = (
        dg * k * dd
        + c.n_layers_local_decoder * block_params(dd, c.n_heads_local_decoder, c.n_kv_heads, ffn_d)
        + (c.n_layers_local_decoder if c.cross_attn_all_layers_decoder else 1) * cross_params(dd)
        + dd
        + dd * c.vocab_size
    )
    return encoder + trunk + decoder


def entropy_params(c: EntropyModelConfig) -> int:
    return 2 * c.vocab_size * c.dim + c.n_layers * block_params(c.dim, c.n_heads, c.n_kv_heads, c.hidden_dim) + c.dim


def stack_activation_bytes(rows: int, positions: int, dim: int, ffn: int, n_layers: int) -> int:
    """Activations a stack of transformer blocks saves for backward, fp32: per position and layer the
    norms, q/k/v/output projections and attention output (~8 * dim) and the SwiGLU's three ffn-wide tensors."""
    return 4 * rows * positions * n_layers * (8 * dim + 3 * ffn)


def training_bytes(n_params: int, rows: int, stacks: list[tuple[int, int, int, int]], vocab: int, seq_len: int) -> int:
    """Estimated bytes to train: parameters + optimizer state + saved activations + logits (x3: values,
    softmax, gradient). `stacks` holds (positions, dim, ffn, n_layers) per transformer stack."""
    acts = sum(stack_activation_bytes(rows, pos, dim, ffn, layers) for pos, dim, ffn, layers in stacks)
    logits = 3 * 4 * rows * seq_len * vocab
    return BYTES_PER_PARAM * n_params + acts + logits


def available_cpu_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"
