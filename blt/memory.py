"""How much memory a training job will take, estimated from its config before anything is allocated.

float32 training with AdamW keeps four numbers per parameter (the weight, its gradient, two moments): 16
bytes. On top of that the backward pass needs the activations each layer saved, and the loss the logits
with their softmax and gradient. The estimate counts those; it is a floor (allocator slack, kernels'
workspaces and the data are not counted), so a job it refuses would surely not fit.

Per device under torchrun (`device_bytes`, `blt memory`): DDP keeps all 16 bytes per parameter on every device
plus its gradient buckets; FSDP keeps 16/world, plus the units being gathered (two at a time: the one computing
and the one prefetched, weights and unsharded gradients). Each device computes batch/world sequences; with
activation checkpointing a block keeps only its input and recomputes the rest in backward.
"""

from __future__ import annotations

import os

from blt.config import BLTConfig, EntropyModelConfig


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


def stack_activation_bytes(rows: int, positions: int, dim: int, ffn: int, n_layers: int, elem: int = 4) -> int:
    """Activations a stack of transformer blocks saves for backward, `elem` bytes each (fp32: 4): per position
    and layer the norms, q/k/v/output projections and attention output (~8 * dim) and the SwiGLU's three
    ffn-wide tensors."""
    return elem * rows * positions * n_layers * (8 * dim + 3 * ffn)


def blt_stacks(c: BLTConfig, seq_len: int, patch_bytes: float) -> list[tuple[int, int, int, int]]:
    """(positions, dim, ffn, layers) of a BLT's three stacks for a sequence of `seq_len` bytes."""
    patches = max(1, round(seq_len / patch_bytes))
    ffn_e, ffn_g, ffn_d = c.ffn_dims
    return [
        (seq_len, c.dim_local_encoder, ffn_e, c.n_layers_local_encoder),
        (patches, c.dim_global, ffn_g, c.n_layers_global),
        (seq_len, c.dim_local_decoder, ffn_d, c.n_layers_local_decoder),
    ]


def blt_units(c: BLTConfig) -> list[int]:
    """Parameters of each unit FSDP gathers at once (training/parallel.py): every block, every embedding table,
    and what each of the three top-level modules holds besides them."""
    ffn_e, ffn_g, ffn_d = c.ffn_dims
    de, dg, dd, k = c.dim_local_encoder, c.dim_global, c.dim_local_decoder, c.cross_attn_k
    hashes = c.encoder_hash_byte_group_nb_functions * len(c.encoder_hash_byte_group_size)
    blocks = (
        [block_params(de, c.n_heads_local_encoder, c.n_kv_heads, ffn_e)] * c.n_layers_local_encoder
        + [block_params(dg, c.n_heads_global, c.n_kv_heads_global, ffn_g)] * c.n_layers_global
        + [block_params(dd, c.n_heads_local_decoder, c.n_kv_heads, ffn_d)] * c.n_layers_local_decoder
    )
    tables = [c.vocab_size * de] + [c.encoder_hash_byte_group_vocab * de] * hashes
    encoder = de * k * de + (c.n_layers_local_encoder if c.cross_attn_all_layers_encoder else 1) * cross_params(de)
    trunk = k * de * dg if k * de != dg else 0
    decoder = (
        dg * k * dd
        + (c.n_layers_local_decoder if c.cross_attn_all_layers_decoder else 1) * cross_params(dd)
        + dd
        + dd * c.vocab_size
    )
    return blocks + tables + [encoder, trunk, decoder]


def entropy_units(c: EntropyModelConfig) -> list[int]:
    blocks = [block_params(c.dim, c.n_heads, c.n_kv_heads, c.hidden_dim)] * c.n_layers
    return blocks + [c.vocab_size * c.dim, c.vocab_size * c.dim + c.dim]  # embedding; output with its norm


def device_bytes(
    units: list[int],
    stacks: list[tuple[int, int, int, int]],
    vocab: int,
    seq_len: int,
    rows: int,
    world: int = 1,
    parallel: str = "ddp",
    bf16: bool = False,
    activation_checkpointing: bool = False,
) -> dict[str, int]:
    """Estimated bytes on each device, by what holds them, for `rows` sequences per device (the global batch
    / world) of a model whose FSDP units hold `units` parameters (together: all of them). `bf16`: CUDA's
    mixed precision (DDP: autocast over fp32 weights; FSDP: bf16 gathered weights, fp32 gradient reduction)."""
    n = sum(units)
    shards = world if parallel == "fsdp" else 1
    half = 2 if bf16 else 4
    out = {"parameters": 4 * n // shards, "gradients": 4 * n // shards, "optimizer": 8 * n // shards}
    if parallel == "fsdp" and world > 1:
        out["communication"] = 2 * max(units) * (half + 4)  # two units in flight: gathered weights + gradients
    elif parallel == "ddp" and world > 1:
        out["communication"] = 4 * n  # DDP's gradient buckets
    else:
        out["communication"] = 0
    out["bf16 weights"] = 2 * n if bf16 and shards == 1 else 0  # autocast's copies, kept for backward
    if activation_checkpointing:  # each block's input, plus one block's activations while it is recomputed
        kept = sum(half * rows * pos * dim * layers for pos, dim, _, layers in stacks)
        acts = kept + max(stack_activation_bytes(rows, pos, dim, ffn, 1, half) for pos, dim, ffn, _ in stacks)
    else:
        acts = sum(stack_activation_bytes(rows, pos, dim, ffn, layers, half) for pos, dim, ffn, layers in stacks)
    out["activations"] = acts
    out["logits"] = 3 * 4 * rows * seq_len * vocab
    return out


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
