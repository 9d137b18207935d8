"""Exact incremental decoding: caches at every level, one byte per row per step.

    entropy model   sliding-window KV cache; its entropy after byte t decides, before byte t+1
                    exists, whether t+1 opens a patch
    local encoder   sliding-window KV cache; the byte states of the open patch are kept, and the patch
                    is pooled (max-pool + cross-attention) once its last byte has arrived
    global          KV cache growing by one entry per patch; runs only when a patch closes, and only
                    for the rows whose patch closed
    local decoder   sliding-window KV cache; the cross-attention keys/values of the patch it reads
                    are computed once per patch

A prompt is prefilled in one pass; every step then costs the same whatever the position (the local
caches are bounded by the window), except the global attention over the patches so far. The result
is what recomputing the whole model over the whole prefix gives (`blt.inference.reference.generate_recompute`),
byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from blt.errors import BltError
from blt.inference.kv_cache import GrowingCache, KVCache, stack_cache
from blt.model.blt import BLT, check_ids
from blt.model.entropy_model import entropy
from blt.model.masks import sequence_self_mask
from blt.model.patching import EntropyPatcher, limit_patch_length
from blt.tokenizer import BOE_ID


@dataclass
class DecodingState:
    """Everything a batch of rows carries from one byte to the next, each row on its own clock."""

    positions: torch.Tensor  # [B] position of the next byte
    n_patches: torch.Tensor  # [B] closed patches (entries of the global cache)
    last_start: torch.Tensor  # [B] position of the last patch start the rule made (for max_patch_length)
    history: torch.Tensor  # [B, n] the last ids (hash n-grams and the patch rule read them)
    prev_entropy: torch.Tensor | None  # [B] H at the byte before last, and ...
    cur_entropy: torch.Tensor | None  # [B] ... at the last byte (entropy patching only)
    read_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per decoder cross-attention: keys/values [B, 1, k, H, hd]
    open: list[list[torch.Tensor]]  # per row, per encoder cross-attention layer: states of the open patch [n, D]
    entropy_cache: KVCache | None  # a WindowCache for a windowed stack, else a GrowingCache
    encoder_cache: KVCache
    decoder_cache: KVCache
    global_cache: GrowingCache


class IncrementalBLT:
    """Prefill and one-byte steps of a batch of rows for one BLT; `state` is set by `prefill`."""

    def __init__(self, model: BLT):
        if model.patcher is None:
            raise BltError("generation needs the model's patcher (an entropy model for entropy patching)")
        self.model = model
        self.config = model.config
        self.patcher = model.patcher
        hash_embeddings = model.local_encoder.hash_embeddings
        self.hash_history = hash_embeddings.history if hash_embeddings is not None else 0
        self.state: DecodingState | None = None

    def _device_dtype(self):
        p = self.model.local_encoder.tok_embeddings.weight
        return p.device, p.dtype

    def _local_cache(self, n_layers, n_heads, batch, device, dtype) -> KVCache:
        c = self.config
        head_dim = c.dim_local_encoder // n_heads
        return stack_cache(
            n_layers, batch, c.n_kv_heads or n_heads, head_dim, c.local_attention_window_len, device, dtype
        )

    # ---- prefill ----------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, rows: Sequence[torch.Tensor], every_position: bool = False) -> torch.Tensor:
        """Run the prompts (ids, BOS first) in one pass and fill every cache -> next-byte logits [B, V]
        (or, with `every_position`, the logits of every prompt position [B, T, V])."""
        m, c = self.model, self.config
        device, dtype = self._device_dtype()
        ids = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = r
        ids = check_ids(ids.to(device), c.vocab_size)
        lengths = torch.tensor([len(r) for r in rows], device=device)
        batch, rows_idx = len(rows), torch.arange(len(rows), device=device)

        # entropies and patches over the (right-padded) prompts
        entropies, entropy_cache = None, None
        if isinstance(self.patcher, EntropyPatcher):
            em = self.patcher.entropy_model
            ec = em.config
            n_kv = ec.n_kv_heads or ec.n_heads
            entropy_cache = stack_cache(
                ec.n_layers, batch, n_kv, ec.dim // ec.n_heads, ec.sliding_window, device, dtype
            )
            entropy_cache.prefill(lengths)
            entropies = entropy(em(ids, cache=entropy_cache))
        raw = self.patcher.boundaries(ids, entropies)
        starts = limit_patch_length(raw, self.patcher.max_patch_length)
        patch_of = starts.long().cumsum(1) - 1
        closed = patch_of[rows_idx, lengths]  # patches that ended before the next byte
        if int(closed.max()) > c.max_seqlen:
            raise BltError(
                f"the prompt makes {int(closed.max())} patches; the global transformer's context is "
                f"{c.max_seqlen} patches (max_seqlen)"
            )

        # local encoder, global transformer over the closed patches, local decoder
        self_mask = sequence_self_mask(ids, c.local_attention_window_len, c.local_document_mask)
        enc, dec, glb = m.local_encoder, m.local_decoder, m.global_transformer
        encoder_cache = self._local_cache(c.n_layers_local_encoder, c.n_heads_local_encoder, batch, device, dtype)
        decoder_cache = self._local_cache(c.n_layers_local_decoder, c.n_heads_local_decoder, batch, device, dtype)
        n_kv_global = c.n_kv_heads_global or c.n_heads_global
        global_cache = GrowingCache(
            c.n_layers_global, batch, n_kv_global, c.dim_global // c.n_heads_global, device, dtype
        )
        encoder_cache.prefill(lengths)
        num_patches = int(patch_of[:, -1].max()) + 1
        h, patch_vectors, states = enc(ids, patch_of[:, :-1], num_patches, self_mask, cache=encoder_cache)
        n_closed = int(closed.max())
        global_cache.prefill(closed)
        global_out = glb(patch_vectors[:, :n_closed], cache=global_cache)
        decoder_cache.prefill(lengths)
        dec_patch = (patch_of[:, 1:] - 1).clamp(max=n_closed - 1)  # padding positions may point past the closed patches
        all_logits = dec(h, global_out, dec_patch, self_mask, cache=decoder_cache)
        logits = all_logits if every_position else all_logits[rows_idx, lengths - 1]

        # what the steps need to continue each row
        last = closed - 1
        pos = torch.arange(ids.shape[1] + 1, device=device)
        opens = starts[rows_idx, lengths]  # does the next byte open a patch?
        prev_entropy = cur_entropy = None
        if entropies is not None:
            nan = entropies.new_tensor(float("nan"))
            prev_entropy = torch.stack([entropies[b, lengths[b] - 2] if lengths[b] >= 2 else nan for b in range(batch)])
            cur_entropy = entropies[rows_idx, lengths - 1]
        # byte states of each row's open patch (empty when the next byte opens a patch)
        patch_start = (
            torch.where(starts, pos, torch.zeros_like(pos)).masked_fill(pos >= lengths[:, None], 0).max(1).values
        )
        history = max(self.hash_history, 2)
        self.state = DecodingState(
            positions=lengths.clone(),
            n_patches=closed.clone(),
            last_start=torch.where(raw, pos, torch.zeros_like(pos))
            .masked_fill(pos > lengths[:, None], 0)
            .max(1)
            .values,
            history=torch.stack([self._tail(ids[b, : lengths[b]], history) for b in range(batch)]),
            prev_entropy=prev_entropy,
            cur_entropy=cur_entropy,
            read_kv=[(k[rows_idx, last][:, None], v[rows_idx, last][:, None]) for k, v in dec.patch_kv(global_out)],
            open=[
                [s[b, patch_start[b] : lengths[b]] if not opens[b] else s[b, :0] for s in states] for b in range(batch)
            ],
            entropy_cache=entropy_cache,
            encoder_cache=encoder_cache,
            decoder_cache=decoder_cache,
            global_cache=global_cache,
        )
        return logits

    @staticmethod
    def _tail(ids: torch.Tensor, n: int) -> torch.Tensor:
        """The last `n` ids, left-padded with id 0 as the hash n-grams pad."""
        tail = ids[-n:]
        return torch.cat([torch.full((n - len(tail),), BOE_ID, dtype=ids.dtype, device=ids.device), tail])

    # ---- one byte per row ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, next_ids: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Feed one id per row -> the next logits [B, V]. Rows not `active` (finished) still move
        along but cannot fail."""
        m, c, s = self.model, self.config, self.state
        pos = s.positions
        next_ids = next_ids.to(pos.device)
        prev_id, cur_id = s.history[:, -1], next_ids

        # does the byte after this one open a patch? (the same rule as over a whole sequence)
        if isinstance(self.patcher, EntropyPatcher):
            h_next = entropy(self.patcher.entropy_model.step(next_ids, pos, s.entropy_cache))
            s.prev_entropy, s.cur_entropy = s.cur_entropy, h_next
        q = pos + 1
        natural = self.patcher.rule(prev_id, cur_id, s.prev_entropy, s.cur_entropy, q)
        natural = torch.as_tensor(natural, device=pos.device).expand_as(q) | (q <= 1)
        s.last_start = torch.where(natural, q, s.last_start)
        limit = self.patcher.max_patch_length
        opens_next = natural | ((q - s.last_start) % limit == 0) if limit else natural

        # local encoder: this byte's states join its (open) patch
        window = c.local_attention_window_len
        h, states = m.local_encoder.step(next_ids, s.history, pos, window, s.encoder_cache)
        s.history = torch.cat([s.history[:, 1:], next_ids[:, None]], dim=1)
        for b in range(len(pos)):
            s.open[b] = [torch.cat([o, st[b]]) for o, st in zip(s.open[b], states)]

        # rows whose patch ends with this byte: pool it, one global step, new keys for the decoder
        closing = opens_next.nonzero().flatten()
        if len(closing):
            full = s.n_patches[closing] >= c.max_seqlen
            if active is not None:
                full &= active.to(full.device)[closing]
            if bool(full.any()):
                raise BltError(
                    f"the text reached the global transformer's context of {c.max_seqlen} patches (max_seqlen)"
                )
            vectors = self._pool_open(closing)
            out = m.global_transformer.step(vectors, s.n_patches[closing], closing, s.global_cache)
            for j, (k, v) in enumerate(m.local_decoder.patch_kv(out[:, None])):
                rk, rv = s.read_kv[j]
                rk[closing], rv[closing] = k, v
            s.n_patches[closing] += 1
            for b in closing.tolist():
                s.open[b] = [o[:0] for o in s.open[b]]

        logits = m.local_decoder.step(h, s.read_kv, pos, window, s.decoder_cache)
        s.positions = pos + 1
        return logits

    def _pool_open(self, rows: torch.Tensor) -> torch.Tensor:
        """Representations [n, k*D] of the open patches of `rows` (their bytes are all here)."""
        s = self.state
        first = s.open[int(rows[0])]
        longest = max(len(s.open[b][0]) for b in rows.tolist())
        dim, dtype, device = first[0].shape[-1], first[0].dtype, s.positions.device
        states = [torch.zeros(len(rows), longest, dim, device=device, dtype=dtype) for _ in first]
        member = torch.ones(len(rows), longest, dtype=torch.long, device=device)  # patch 1: padding
        for i, b in enumerate(rows.tolist()):
            n = len(s.open[b][0])
            member[i, :n] = 0
            for st, o in zip(states, s.open[b]):
                st[i, :n] = o
        return self.model.local_encoder.pool_patches(states, member, 2)[:, 0]
