"""How much memory a training job will take, estimated from its config before anything is allocated.

float32 training with AdamW keeps four numbers per parameter (the weight, its gradient, two moments): 16
bytes. On top of that the backward pass needs the activations each layer saved, and the loss the logits
with their softmax and gradient. The estimate counts those; it is a floor (allocator slack, kernels'
workspaces and the data are not counted), so a job it refuses would surely not fit.
"""

from __future__ import annotations

import os

BYTES_PER_PARAM = 16  # fp32 weight + gradient + AdamW's two moments


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
