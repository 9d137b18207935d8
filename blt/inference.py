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
is what recomputing the whole model over the whole prefix gives (`blt.generation.generate_recompute`),
byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from blt.entropy_model import entropy
from blt.errors import BltError
from blt.generation import StopChecker, allowed_ids, check_generation_args, row_generators, sample_next
from blt.kv_cache import KVCache
from blt.model import BLT, check_ids
from blt.masks import sequence_self_mask
from blt.patching import EntropyPatcher, limit_patch_length
from blt.tokenizer import BOE_ID, EOS_ID, OFFSET


class IncrementalBLT:
    """Decoding state of a batch of rows for one BLT."""

    def __init__(self, model: BLT):
        if model.patcher is None:
            raise BltError("generation needs the model's patcher (an entropy model for entropy patching)")
        self.model = model
        self.config = model.config
        self.patcher = model.patcher
        self.hash_history = model.local_encoder.hash_embeddings.history if model.local_encoder.hash_embeddings else 0

    def _device_dtype(self):
        p = self.model.local_encoder.tok_embeddings.weight
        return p.device, p.dtype

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
        entropies = None
        if isinstance(self.patcher, EntropyPatcher):
            em = self.patcher.entropy_model
            ec = em.config
            self.entropy_cache = KVCache(ec.n_layers, batch, ec.n_kv_heads or ec.n_heads, ec.dim // ec.n_heads, ec.sliding_window, device, dtype)
            self.entropy_cache.prefill(lengths)
            entropies = entropy(em(ids, cache=self.entropy_cache))
        raw = self.patcher.boundaries(ids, entropies)
        starts = limit_patch_length(raw, self.patcher.max_patch_length)
        patch_of = starts.long().cumsum(1) - 1
        closed = patch_of[rows_idx, lengths]  # patches that ended before the next byte
        if int(closed.max()) > c.max_seqlen:
            raise BltError(f"the prompt makes {int(closed.max())} patches; the global transformer's context is {c.max_seqlen} patches (max_seqlen)")

        # local encoder, global transformer over the closed patches, local decoder
        window = c.local_attention_window_len
        self_mask = sequence_self_mask(ids, window, c.local_document_mask)
        enc, dec, glb = m.local_encoder, m.local_decoder, m.global_transformer
        self.encoder_cache = self._local_cache(c.n_layers_local_encoder, c.n_heads_local_encoder, batch, device, dtype)
        self.decoder_cache = self._local_cache(c.n_layers_local_decoder, c.n_heads_local_decoder, batch, device, dtype)
        self.global_cache = KVCache(c.n_layers_global, batch, c.n_kv_heads_global or c.n_heads_global, c.dim_global // c.n_heads_global, None, device, dtype)
        self.encoder_cache.prefill(lengths)
        num_patches = int(patch_of[:, -1].max()) + 1
        h, patch_vectors, states = enc(ids, patch_of[:, :-1], num_patches, self_mask, cache=self.encoder_cache)
        n_closed = int(closed.max())
        self.global_cache.prefill(closed)
        global_out = glb(patch_vectors[:, :n_closed], cache=self.global_cache)
        self.decoder_cache.prefill(lengths)
        dec_patch = (patch_of[:, 1:] - 1).clamp(max=n_closed - 1)  # padding positions may point past the closed patches
        all_logits = dec(h, global_out, dec_patch, self_mask, cache=self.decoder_cache)
        logits = all_logits if every_position else all_logits[rows_idx, lengths - 1]

        # what the steps need to continue each row
        last = closed - 1
        self.read_kv = [(k[rows_idx, last][:, None], v[rows_idx, last][:, None]) for k, v in dec.patch_kv(global_out)]
        self.positions = lengths.clone()
        self.n_patches = closed.clone()
        opens = starts[rows_idx, lengths]  # does the next byte open a patch?
        pos = torch.arange(ids.shape[1] + 1, device=device)
        self.last_start = torch.where(raw, pos, torch.zeros_like(pos)).masked_fill(pos > lengths[:, None], 0).max(1).values
        history = max(self.hash_history, 2)
        self.history = torch.stack([self._tail(ids[b, : lengths[b]], history) for b in range(batch)])
        self.prev_entropy = self.cur_entropy = None
        if entropies is not None:
            self.prev_entropy = torch.stack([entropies[b, lengths[b] - 2] if lengths[b] >= 2 else entropies.new_tensor(float("nan")) for b in range(batch)])
            self.cur_entropy = entropies[rows_idx, lengths - 1]
        # byte states of each row's open patch (empty when the next byte opens a patch)
        patch_start = torch.where(starts, pos, torch.zeros_like(pos)).masked_fill(pos >= lengths[:, None], 0).max(1).values
        self.open = [[s[b, patch_start[b] : lengths[b]] if not opens[b] else s[b, :0] for s in states] for b in range(batch)]
        return logits

    def _local_cache(self, n_layers, n_heads, batch, device, dtype) -> KVCache:
        c = self.config
        return KVCache(n_layers, batch, c.n_kv_heads or n_heads, c.dim_local_encoder // n_heads, c.local_attention_window_len, device, dtype)

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
        m, c = self.model, self.config
        pos = self.positions
        next_ids = next_ids.to(pos.device)
        prev_id, cur_id = self.history[:, -1], next_ids

        # does the byte after this one open a patch? (the same rule as over a whole sequence)
        if isinstance(self.patcher, EntropyPatcher):
            h_next = entropy(self.patcher.entropy_model.step(next_ids, pos, self.entropy_cache))
            self.prev_entropy, self.cur_entropy = self.cur_entropy, h_next
        q = pos + 1
        natural = torch.as_tensor(self.patcher.rule(prev_id, cur_id, self.prev_entropy, self.cur_entropy, q), device=pos.device).expand_as(q)
        natural = natural | (q <= 1)
        self.last_start = torch.where(natural, q, self.last_start)
        limit = self.patcher.max_patch_length
        opens_next = natural | ((q - self.last_start) % limit == 0) if limit else natural

        # local encoder: this byte's states join its (open) patch
        window = c.local_attention_window_len
        h, states = m.local_encoder.step(next_ids, self.history, pos, window, self.encoder_cache)
        self.history = torch.cat([self.history[:, 1:], next_ids[:, None]], dim=1)
        for b in range(len(pos)):
            self.open[b] = [torch.cat([o, s[b]]) for o, s in zip(self.open[b], states)]

        # rows whose patch ends with this byte: pool it, one global step, new keys for the decoder
        closing = opens_next.nonzero().flatten()
        if len(closing):
            full = self.n_patches[closing] >= c.max_seqlen
            if active is not None:
                full &= active.to(full.device)[closing]
            if bool(full.any()):
                raise BltError(f"the text reached the global transformer's context of {c.max_seqlen} patches (max_seqlen)")
            vectors = self._pool_open(closing)
            out = m.global_transformer.step(vectors, self.n_patches[closing], closing, self.global_cache)
            for j, (k, v) in enumerate(m.local_decoder.patch_kv(out[:, None])):
                rk, rv = self.read_kv[j]
                rk[closing], rv[closing] = k, v
            self.n_patches[closing] += 1
            for b in closing.tolist():
                self.open[b] = [o[:0] for o in self.open[b]]

        logits = m.local_decoder.step(h, self.read_kv, pos, window, self.decoder_cache)
        self.positions = pos + 1
        return logits

    def _pool_open(self, rows: torch.Tensor) -> torch.Tensor:
        """Representations [n, k*D] of the open patches of `rows` (their bytes are all here)."""
        n_states = len(self.open[int(rows[0])])
        longest = max(len(self.open[b][0]) for b in rows.tolist())
        dim = self.open[int(rows[0])][0].shape[-1]
        device = self.positions.device
        states = [torch.zeros(len(rows), longest, dim, device=device, dtype=self.open[int(rows[0])][0].dtype) for _ in range(n_states)]
        member = torch.ones(len(rows), longest, dtype=torch.long, device=device)  # patch 1: padding
        for i, b in enumerate(rows.tolist()):
            n = len(self.open[b][0])
            member[i, :n] = 0
            for s, o in zip(states, self.open[b]):
                s[i, :n] = o
        return self.model.local_encoder.pool_patches(states, member, 2)[:, 0]


# ---- generation ---------------------------------------------------------------------------------
@torch.no_grad()
def stream(model: BLT, prompts: Sequence[str | bytes], max_new_bytes: int, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, seed: int | None = None, stop: Sequence[str | bytes] | None = None,
           stop_at_eos: bool = True, return_logits: bool = False) -> Iterator[list]:
    """Generate step by step. Each step yields one item per prompt: the bytes it added (b"" for a
    BPE delimiter), or (bytes, logits it sampled from) with `return_logits`; None once the row is done
    (EOS, a stop string, or `max_new_bytes`)."""
    raw = check_generation_args(prompts, max_new_bytes, temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    try:
        engine = IncrementalBLT(model)
        logits = engine.prefill([model.encode(p) for p in raw])
        bpe = model.patcher.mode == "bpe"
        allowed = allowed_ids(stop_at_eos, bpe, logits.device)
        generators = row_generators(seed, len(raw))
        stopper = StopChecker(stop)
        new = [bytearray() for _ in raw]
        shown = [0] * len(raw)  # bytes of `new` already yielded
        done = [False] * len(raw)
        budget = 2 * max_new_bytes + 16 if bpe else max_new_bytes  # delimiters add steps, not bytes
        for step in range(budget):
            ids = sample_next(logits, allowed, temperature, top_k, top_p, generators)
            out = []
            for b, nxt in enumerate(ids.tolist()):
                if done[b]:
                    out.append(None)
                    continue
                if nxt == EOS_ID:
                    done[b] = True
                elif nxt >= OFFSET:
                    new[b].append(nxt - OFFSET)
                    keep = stopper.cut(bytes(new[b]))
                    if keep is not None:
                        del new[b][keep:]
                        done[b] = True
                    done[b] = done[b] or len(new[b]) >= max_new_bytes
                end = len(new[b]) if done[b] or step == budget - 1 else stopper.safe(bytes(new[b]))
                piece, shown[b] = bytes(new[b][shown[b] : end]), max(shown[b], end)
                out.append((piece, logits[b].float().cpu()) if return_logits else piece)
            yield out
            if all(done):
                return
            logits = engine.step(ids, active=torch.tensor([not d for d in done]))
    finally:
        model.train(was_training)


def generate(model: BLT, prompts: Sequence[str | bytes], max_new_bytes: int, return_logits: bool = False, **kwargs):
    """The new bytes of every prompt (with `return_logits`, also the logits of every step [n, V])."""
    outputs = [bytearray() for _ in prompts]
    steps: list[list[torch.Tensor]] = [[] for _ in prompts]
    for items in stream(model, prompts, max_new_bytes, return_logits=True, **kwargs):
        for b, item in enumerate(items):
            if item is not None:
                outputs[b] += item[0]
                steps[b].append(item[1])
    result = [bytes(o) for o in outputs]
    return (result, [torch.stack(s) for s in steps]) if return_logits else result


# ---- scoring ------------------------------------------------------------------------------------
@torch.no_grad()
def score(model: BLT, data: str | bytes, max_forward: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log2 p of every id of `data` after BOS given the ids before it, and which of them are bytes.

    A text that fits (`max_forward` ids, default the model's `max_encoder_seq_length`) takes one
    forward pass; a longer one is prefilled up to that length and continued one byte at a time with
    the caches, so memory stays bounded and the numbers are those of the whole text.
    """
    model.eval()
    ids = model.encode(data)
    device = model.local_encoder.tok_embeddings.weight.device
    ids = ids.to(device)
    limit = max_forward or model.config.max_encoder_seq_length
    if len(ids) < 2:
        raise BltError("nothing to score: the text is empty")
    if len(ids) <= limit:
        logits = model(ids[None])[0, :-1]
    else:
        from tqdm.auto import tqdm

        engine = IncrementalBLT(model)
        steps = [engine.prefill([ids[:limit]], every_position=True)[0]]
        for p in tqdm(range(limit, len(ids) - 1), desc="score", unit="B", leave=False, disable=len(ids) - limit < 2000):
            steps.append(engine.step(ids[p : p + 1]))
        logits = torch.cat(steps)
    targets = ids[1:]
    logp = torch.log_softmax(logits.float(), -1).gather(1, targets[:, None])[:, 0] / torch.log(torch.tensor(2.0))
    return logp.cpu(), (targets >= OFFSET).cpu()
