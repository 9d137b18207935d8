"""Bits per byte: the summed next-byte cross-entropy in bits divided by the number of predicted bytes.

Targets that are bytes count in both sums. A BPE delimiter (only present with the `bpe` patcher) is
part of what the model must predict to produce the text, so its bits count while it adds no byte.
BOS/EOS targets (document framing) are left out of both. A token model (the `bpe` baseline) passes
`bytes_per_id`, the byte length of every token, so its bits are divided by the bytes of the text.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from blt.model.entropy_model import EntropyModel
from blt.model.patching import EntropyPatcher, Patcher
from blt.tokenizer import BPE_ID, OFFSET, VOCAB_SIZE


def windows(stream_len: int, seq_len: int, context: int = 0) -> list[tuple[int, int, int]]:
    """Input windows (s, e, k) over a stream: ids [s, e) go in, and the predictions at offsets k.. of the
    window are scored, so that every predicted position is scored exactly once.

    With `context` 0 the windows do not overlap (k is always 0): the first bytes of each window are predicted
    from almost nothing. With `context` c > 0 each window after the first starts c ids before its first scored
    position, so every scored prediction sees at least c ids before it (the strided evaluation of fixed-length
    models): a stride of seq_len - c, and seq_len / (seq_len - c) times the compute.
    """
    if not 0 <= context < seq_len:
        raise ValueError(f"context must be in [0, seq_len), got {context} for seq_len {seq_len}")
    last = stream_len - 1  # the last id has no target
    if last <= 0:
        return []
    spans = [(0, min(seq_len, last), 0)]
    while spans[-1][1] < last:
        scored = spans[-1][1]  # the first position not yet scored
        s = scored - context
        spans.append((s, min(s + seq_len, last), context))
    return spans


def patch_starts_for(patcher: Patcher, ids: torch.Tensor, entropies: torch.Tensor | None) -> torch.Tensor:
    """Patch starts of a batch, from precomputed entropies when the patcher is entropy-based."""
    if isinstance(patcher, EntropyPatcher) and entropies is not None:
        return patcher.starts_from_entropies(entropies)
    return patcher(ids)


def byte_lengths() -> torch.Tensor:
    """Bytes per id of the byte vocabulary: 1 for a byte, 0 for a special id."""
    return (torch.arange(VOCAB_SIZE) >= OFFSET).long()


@torch.no_grad()
def evaluate_stream(
    model,
    stream: np.ndarray,
    seq_len: int,
    batch_size: int = 8,
    entropies: np.ndarray | None = None,
    max_windows: int | None = None,
    autocast=None,
    bytes_per_id: torch.Tensor | None = None,
    context: int = 0,
    progress: bool = False,
) -> dict:
    """bpb of `model` (a BLT, or an LM over ids such as the entropy model or a token model) over `stream`.

    `context` > 0 scores overlapping windows so that every prediction sees at least that many ids before it
    (see `windows`); 0 scores non-overlapping windows, cheaper but harder on each window's first bytes.
    `progress` draws a bar over the windows."""
    bytes_per_id = byte_lengths() if bytes_per_id is None else bytes_per_id
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    spans = windows(len(stream), seq_len, context)[:max_windows]
    bits = 0.0
    n_bytes = n_positions = n_patches = 0
    by_len: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:
        by_len.setdefault(span[1] - span[0], []).append(span)
    bar = tqdm(total=len(spans), desc="eval", unit="window", disable=not progress, leave=False)
    for length, group in by_len.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            bar.update(len(chunk))
            ids = torch.from_numpy(np.stack([stream[s:e] for s, e, _ in chunk]).astype(np.int64))
            targets = torch.from_numpy(np.stack([stream[s + 1 : e + 1] for s, e, _ in chunk]).astype(np.int64))
            scored = torch.arange(length)[None, :] >= torch.tensor([k for _, _, k in chunk])[:, None]
            with autocast() if autocast else nullcontext():
                if isinstance(model, EntropyModel):
                    logits = model(ids.to(device))
                else:
                    ent = (
                        torch.from_numpy(np.stack([entropies[s:e] for s, e, _ in chunk]).astype(np.float32))
                        if entropies is not None
                        else None
                    )
                    starts = patch_starts_for(model.patcher, ids, ent)
                    n_patches += int((starts[:, :length].bool() & scored.to(starts.device)).sum())
                    logits = model(ids.to(device), patch_starts=starts.to(device))
            nll = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(), reduction="none").view_as(
                targets
            )
            lengths = bytes_per_id[targets] * scored
            counted = ((lengths > 0) | (targets == BPE_ID)) & scored
            bits += float(nll[counted.to(device)].sum()) / math.log(2)
            n_bytes += int(lengths.sum())
            n_positions += int(scored.sum())
    bar.close()
    model.train(was_training)
    out = {"bpb": bits / max(n_bytes, 1), "n_bytes": n_bytes, "bits": bits}
    if n_patches:
        out["mean_patch_bytes"] = n_positions / n_patches
        out["n_patches"] = n_patches
    return out


def unigram_bpb(train_stream: np.ndarray, eval_stream: np.ndarray) -> float:
    """bpb of a unigram byte model fitted on the training bytes (add-one smoothing): the reference
    a model must beat to have learned anything beyond byte frequencies."""
    counts = np.bincount(train_stream[train_stream >= OFFSET].astype(np.int64) - OFFSET, minlength=256) + 1.0
    logp = np.log2(counts / counts.sum())
    eval_bytes = eval_stream[eval_stream >= OFFSET].astype(np.int64) - OFFSET
    return float(-logp[eval_bytes].mean())
