"""Exact speculative decoding: draft a few bytes cheaply, check them all with one pass of the whole model.

Every round, each row has one decided byte y that the model has not read yet, and:

    draft    k bytes after y from a cheap model, on the side (the decoding state is not touched):
               "self"     the local encoder and decoder keep going past the patch boundary, reading the last
                          global output: no entropy model, no global step (self-speculation, BLT-S in
                          Kallini et al., "Fast Byte Latent Transformer")
               "entropy"  the entropy model, a small byte LM of its own that steps every byte anyway
    verify   `SpeculativeBLT.extend` runs every stack once over [y, d1..dk] -> the full model's logits after each
             of them. Entropies and patch boundaries come out of the chunk itself; the patches closing inside
             it (a row may close several) are pooled and go through the global transformer together; each byte
             reads the last patch closed at or before it.
    accept   the longest prefix of the drafts that plain decoding would produce, then one byte of the full model
             after it: greedy, drafts equal to the argmax; sampling, the standard rule (accept d with probability
             min(1, p(d)/q(d)); on rejection sample normalize(max(0, p - q)); after k acceptances sample p), so
             the output has plain sampling's distribution. `accept(n)` then applies the first n bytes of the
             chunk to the state, exactly as n steps would have.

A round costs k cheap steps and one pass of each stack over k+1 bytes, and yields 1..k+1 bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from blt.errors import BltError
from blt.inference.decoding import IncrementalBLT
from blt.inference.kv_cache import KVCache
from blt.inference.sampling import filtered_logits, sample_next
from blt.model.entropy_model import entropy
from blt.model.patching import EntropyPatcher
from blt.model.transformer import RotaryEmbedding, additive_mask, block_chunk

DRAFTS = ("self", "entropy")


def check_speculation(speculate, draft, model) -> None:
    """Refuse a `speculate` / `draft` that cannot run on `model`, naming the value."""
    if not isinstance(speculate, int) or isinstance(speculate, bool) or speculate < 0:
        raise BltError(f"speculate must be an integer >= 0 (draft bytes per round; 0: off), got {speculate!r}")
    if draft not in DRAFTS:
        raise BltError(f"draft must be one of {', '.join(map(repr, DRAFTS))}, got {draft!r}")
    if speculate and draft == "entropy" and not isinstance(model.patcher, EntropyPatcher):
        raise BltError(
            f"draft 'entropy' drafts with the entropy model, and this model patches with "
            f"{model.config.patching.mode!r} without one: use draft='self'"
        )


@dataclass
class SpeculationStats:
    """What a speculative run did, summed over its rows while they were generating."""

    passes: int = 0  # full-model passes: the prefill, then one verification per round
    drafted: int = 0  # bytes drafted
    accepted: int = 0  # drafted bytes the full model kept
    produced: int = 0  # ids the passes gave: the accepted drafts and one of the full model's per pass

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def bytes_per_pass(self) -> float:
        return self.produced / self.passes if self.passes else 0.0

    def summary(self) -> str:
        return (
            f"speculation: {self.accepted}/{self.drafted} drafted bytes accepted ({self.acceptance_rate:.1%}), "
            f"{self.bytes_per_pass:.2f} bytes per full-model pass ({self.passes} passes)"
        )


@dataclass
class Pending:
    """Keys/values of bytes a stack has read but the state has not taken (earlier drafts of this round)."""

    positions: torch.Tensor  # [B, m]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer [B, m, Hkv, hd]

    def then(self, positions: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Pending:
        return Pending(
            torch.cat([self.positions, positions], 1),
            [(torch.cat([k0, k1], 1), torch.cat([v0, v1], 1)) for (k0, v0), (k1, v1) in zip(self.kv, kv)],
        )


@dataclass
class Chunk:
    """What `extend` computed over n bytes per row; `accept` applies a prefix of it to the state."""

    ids: torch.Tensor  # [B, n]
    positions: torch.Tensor  # [B, n]
    entropies: torch.Tensor | None  # [B, n] the entropy after each byte (entropy patching)
    last_start: torch.Tensor  # [B, n] the rule's last patch start after each byte
    opens: torch.Tensor  # [B, n] bool: the byte ends its patch (the next byte opens one)
    entropy_kv: list | None  # per layer of each stack: the n bytes' keys/values [B, n, Hkv, hd]
    encoder_kv: list
    decoder_kv: list
    states: list[torch.Tensor]  # per encoder cross-attention layer [B, L, D]: the open patch's bytes, then the n
    global_kv: list  # per global layer [B, G, Hkv, hd]: the patches closed in the chunk (G: most in one row)
    read_kv: list  # per decoder cross-attention [B, 1 + G, k, H, hd]: the state's patch, then the new ones


class SpeculativeBLT(IncrementalBLT):
    """The engine with several bytes per row per pass: `extend(ids)` reads a chunk without changing the state,
    `accept(n)` takes its first n[b] bytes; `draft` proposes bytes on the side."""

    pending: Chunk | None = None

    @staticmethod
    def _stack(
        blocks,
        h: torch.Tensor,
        rope: RotaryEmbedding,
        positions: torch.Tensor,
        window: int | None,
        cache: KVCache,
        before: Pending | None = None,
        keep: Callable[[int], bool] | None = None,
        cross: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ):
        """A cached stack over n new positions per row [B, n] (h [B, n, D]), attending to the cache, the `before`
        bytes and themselves -> output, the states after the layers `keep` names, and every layer's new keys/values.
        `cross(i, h)` runs before layer i (the decoder's cross-attention)."""
        held, ks, vs = cache.context()
        seen = held if before is None else torch.cat([held, before.positions], 1)
        keys = torch.cat([seen, positions], 1)[:, None, :]  # [B, 1, S + n]
        mask = (keys >= 0) & (keys <= positions[:, :, None])
        if window is not None:
            mask &= keys > positions[:, :, None] - window
        mask = additive_mask(mask[:, None], h.dtype)  # [B, 1, n, S + n]
        rotation = rope(positions)  # [B, n, hd/2]
        kept, new = [], []
        for i, b in enumerate(blocks):
            if cross is not None:
                h = cross(i, h)
            context = (ks[i], vs[i])
            if before is not None:
                context = (torch.cat([ks[i], before.kv[i][0]], 1), torch.cat([vs[i], before.kv[i][1]], 1))
            h, kv = block_chunk(b, h, rotation, mask, context)
            new.append(kv)
            if keep is not None and keep(i):
                kept.append(h)
        return h, kept, new

    def _entropy_model(self, ids: torch.Tensor, positions: torch.Tensor, before: Pending | None = None):
        """The entropy model over n new ids per row -> its logits [B, n, V] and the new keys/values."""
        em = self.patcher.entropy_model
        h, _, kv = self._stack(
            self.em_blocks,
            em.tok_embeddings(ids),
            em.rope,
            positions,
            em.config.sliding_window,
            self.state.entropy_cache,
            before,
        )
        return em.output(em.norm(h)), kv

    def _encode(self, history, ids, positions, before=None):
        enc = self.model.local_encoder
        return self._stack(
            self.enc_blocks,
            self._embed(history, ids),
            enc.rope,
            positions,
            self.config.local_attention_window_len,
            self.state.encoder_cache,
            before,
            keep=enc.has_cross_attn,
        )

    def _decode(self, h, positions, read_kv, read_index, before=None):
        """The local decoder over n bytes per row; byte t reads patch read_index[b, t] of read_kv [B, P, k, H, hd]
        (per cross-attention) -> logits [B, n, V] and the new keys/values."""
        dec = self.model.local_decoder

        def cross(i, h):
            if not dec.has_cross_attn(i):
                return h
            j = i if dec.cross_all_layers else 0
            return h + dec.cross_attn[j].read(h, read_kv[j], read_index)

        h, _, kv = self._stack(
            self.dec_blocks,
            h,
            dec.rope,
            positions,
            self.config.local_attention_window_len,
            self.state.decoder_cache,
            before,
            cross=cross,
        )
        return dec.output(dec.norm(h)), kv

    # ---- verification ---------------------------------------------------------------------------
    @torch.no_grad()
    def extend(self, ids: torch.Tensor) -> torch.Tensor:
        """Read n ids per row [B, n] after the state in one pass per stack -> the logits after each [B, n, V].
        The state is unchanged until `accept`."""
        m, s = self.model, self.state
        ids = ids.to(s.positions.device)
        n = ids.shape[1]
        positions = s.positions[:, None] + torch.arange(n, device=ids.device)  # [B, n]

        # entropies, then the patch rule after every byte (as `step` applies it, byte by byte)
        entropies = entropy_kv = prev_h = cur_h = None
        if self.em_blocks is not None:
            em_logits, entropy_kv = self._entropy_model(ids, positions)
            entropies = entropy(em_logits)
            prev_h, cur_h = torch.cat([s.cur_entropy[:, None], entropies[:, :-1]], 1), entropies
        q = positions + 1
        prev_id = torch.cat([s.history[:, -1:], ids[:, :-1]], 1)
        natural = torch.as_tensor(self.patcher.rule(prev_id, ids, prev_h, cur_h, q), device=q.device)
        natural = natural.expand_as(q) | (q <= 1)
        last_start = torch.cat([s.last_start[:, None], torch.where(natural, q, 0)], 1).cummax(1).values[:, 1:]
        limit = self.patcher.max_patch_length
        opens = natural | ((q - last_start) % limit == 0) if limit else natural

        # local encoder; the open patch and the chunk's bytes side by side, each row's open bytes first
        h, states, encoder_kv = self._encode(s.history, ids, positions)
        held = int(s.open_len.max())
        t = torch.arange(held + n, device=ids.device)
        in_chunk = t >= s.open_len[:, None]
        source = torch.where(in_chunk, held + t - s.open_len[:, None], t).clamp(max=held + n - 1)  # [B, L]
        states = [
            torch.cat([buf[:, :held], st], 1).gather(1, source[..., None].expand(-1, -1, st.shape[-1]))
            for buf, st in zip(s.open, states)
        ]

        # every patch that closes inside the chunk: pooled, then the global transformer over all of them at once
        closed_before = opens.long().cumsum(1) - opens.long()  # [B, n] patches closed in the chunk before byte i
        chunk_byte = (t - s.open_len[:, None]).clamp(0, n - 1)
        member = torch.where(in_chunk, closed_before.gather(1, chunk_byte), 0)
        member = member.masked_fill(t >= s.open_len[:, None] + n, n)  # past the row's bytes: a patch never read
        n_new = int(opens.sum(1).max())
        read_kv = [(k[:, :1], v[:, :1]) for k, v in s.read_kv]  # [B, 1, k, H, hd]
        global_kv = []
        if n_new:
            vectors = m.local_encoder.pool_patches(states, member, n + 1)[:, :n_new]  # [B, G, k*D]
            glb = m.global_transformer
            g = vectors if glb.in_proj is None else glb.in_proj(vectors)
            g_positions = s.n_patches[:, None] + torch.arange(n_new, device=ids.device)
            out, _, global_kv = self._stack(self.glb_blocks, g, glb.rope, g_positions, None, s.global_cache)
            read_kv = [
                (torch.cat([k0, k1], 1), torch.cat([v0, v1], 1))
                for (k0, v0), (k1, v1) in zip(read_kv, m.local_decoder.patch_kv(out))
            ]

        # local decoder: byte i reads the last patch closed at or before it (0: the state's)
        logits, decoder_kv = self._decode(h, positions, read_kv, opens.long().cumsum(1))
        self.pending = Chunk(
            ids,
            positions,
            entropies,
            last_start,
            opens,
            entropy_kv,
            encoder_kv,
            decoder_kv,
            states,
            global_kv,
            read_kv,
        )
        return logits

    @torch.no_grad()
    def accept(self, keep: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Take the first keep[b] (0..n) bytes of the last `extend` of each row: the state becomes what stepping
        them one by one gives. Rows not `active` (finished) cannot fail."""
        c, s, ch = self.config, self.state, self.pending
        self.pending = None
        batch, n = ch.ids.shape
        device = ch.ids.device
        keep = keep.to(device).long()
        rows = torch.arange(batch, device=device)
        before = torch.arange(n, device=device) < keep[:, None]  # [B, n]
        closed = torch.cat([torch.zeros_like(keep[:, None]), ch.opens.long().cumsum(1)], 1)[rows, keep]  # [B]
        n_patches = s.n_patches + closed
        full = n_patches > c.max_seqlen
        if active is not None:
            full &= active.to(device)
        if bool(full.any()):
            raise BltError(f"the text reached the global transformer's context of {c.max_seqlen} patches (max_seqlen)")

        # the caches take the kept bytes (a window cache only the last `size`) and the patches they closed
        def write(cache, kv, positions, taken):
            size = getattr(cache, "size", None)
            if size is not None:
                taken = taken & (positions >= (positions[:, :1] + keep[:, None] - size))
            r, i = taken.nonzero(as_tuple=True)
            cache.write(r, positions[r, i], [k[r, i] for k, _ in kv], [v[r, i] for _, v in kv])

        if ch.entropy_kv is not None:
            write(s.entropy_cache, ch.entropy_kv, ch.positions, before)
        write(s.encoder_cache, ch.encoder_kv, ch.positions, before)
        write(s.decoder_cache, ch.decoder_kv, ch.positions, before)
        if ch.global_kv:
            new = torch.arange(ch.global_kv[0][0].shape[1], device=device)
            write(s.global_cache, ch.global_kv, s.n_patches[:, None] + new, new < closed[:, None])

        # the per-byte values after the last kept byte (index 0: before the chunk)
        s.history = torch.cat([s.history, ch.ids], 1).gather(
            1, keep[:, None] + torch.arange(s.history.shape[1], device=device)
        )
        if ch.entropies is not None:
            ent = torch.cat([s.prev_entropy[:, None], s.cur_entropy[:, None], ch.entropies], 1)
            s.prev_entropy, s.cur_entropy = ent[rows, keep], ent[rows, keep + 1]
        s.last_start = torch.cat([s.last_start[:, None], ch.last_start], 1)[rows, keep]
        for (rk, rv), (k, v) in zip(s.read_kv, ch.read_kv):
            rk.copy_(k[rows, closed][:, None])  # in place: the steps read views of these
            rv.copy_(v[rows, closed][:, None])

        # the open patch: the bytes after the last kept patch end (the earlier open bytes too if none closed)
        last_end = torch.where(ch.opens & before, torch.arange(n, device=device), -1).max(1).values
        start = torch.where(closed > 0, s.open_len + last_end + 1, 0)
        open_len = s.open_len + keep - start
        longest = int(open_len.max())
        if longest >= s.open[0].shape[1]:
            s.open = [torch.nn.functional.pad(buf, (0, 0, 0, longest + 1)) for buf in s.open]
        take = (start[:, None] + torch.arange(longest, device=device)).clamp(max=ch.states[0].shape[1] - 1)
        for buf, st in zip(s.open, ch.states):
            buf[:, :longest] = st.gather(1, take[..., None].expand(-1, -1, st.shape[-1]))
        s.open_len = open_len
        self.open_bound = longest
        s.n_patches = n_patches
        s.positions = s.positions + keep

    # ---- drafting ---------------------------------------------------------------------------------
    @torch.no_grad()
    def draft(
        self, first: torch.Tensor, k: int, source: str, choose: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k bytes after `first` [B] (the next byte, not read yet) from the draft model `source`, each picked by
        `choose(logits [B, V]) -> [B]` -> drafts [B, k] and the logits they were picked from [B, k, V]. The
        state is not changed."""
        s = self.state
        ids, history = first.to(s.positions.device)[:, None], s.history
        before_enc = before_dec = before_em = None
        read_index = torch.zeros_like(ids)
        drafts, logits = [], []
        for j in range(k):
            positions = s.positions[:, None] + j
            if source == "entropy":
                out, kv = self._entropy_model(ids, positions, before_em)
                before_em = Pending(positions, kv) if before_em is None else before_em.then(positions, kv)
            else:  # the local models past the patch boundary: the decoder keeps reading the state's last patch
                h, _, enc_kv = self._encode(history, ids, positions, before_enc)
                out, dec_kv = self._decode(h, positions, s.read_kv, read_index, before_dec)
                before_enc = Pending(positions, enc_kv) if before_enc is None else before_enc.then(positions, enc_kv)
                before_dec = Pending(positions, dec_kv) if before_dec is None else before_dec.then(positions, dec_kv)
                history = torch.cat([history[:, 1:], ids], 1)
            logits.append(out[:, 0])
            ids = choose(out[:, 0])[:, None]
            drafts.append(ids)
        return torch.cat(drafts, 1), torch.stack(logits, 1)


class Speculator:
    """Rounds of draft, verify, accept over a `SpeculativeBLT` after its prefill, with plain decoding's sampling
    settings (`allowed` ids, temperature, top_k, top_p, one generator per row)."""

    def __init__(
        self,
        engine: SpeculativeBLT,
        k: int,
        draft: str,
        allowed: torch.Tensor,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        generators: Sequence[torch.Generator | None],
        stats: SpeculationStats | None = None,
    ):
        self.engine, self.k, self.source = engine, k, draft
        self.allowed, self.temperature, self.top_k, self.top_p = allowed, temperature, top_k, top_p
        self.generators = generators
        self.stats = stats if stats is not None else SpeculationStats()

    def _filtered(self, logits: torch.Tensor) -> torch.Tensor:
        return filtered_logits(logits, self.allowed, self.temperature, self.top_k, self.top_p)

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        return sample_next(logits, self.allowed, self.temperature, self.top_k, self.top_p, self.generators)

    def round(self, last: torch.Tensor, active: torch.Tensor | None) -> tuple[list[list[int]], torch.Tensor]:
        """Read `last` [B] (each row's newest id) and as many drafted bytes as the full model keeps -> per row the
        new ids (the accepted drafts and one of the full model's; the last one not read yet) and the logits each
        was picked from [B, k+1, V] (the first len(ids[b]) of row b)."""
        engine, k = self.engine, self.k
        drafts, draft_logits = engine.draft(last, k, self.source, self._choose)
        logits = engine.extend(torch.cat([last.to(drafts.device)[:, None], drafts], 1))  # [B, k+1, V]
        if self.temperature == 0:
            target = self._filtered(logits).argmax(-1)  # [B, k+1]
            accepted = (drafts == target[:, :k]).long().cumprod(1).sum(1)  # [B]
            nxt = target.gather(1, accepted[:, None])[:, 0]
            accepted, nxt = accepted.tolist(), nxt.tolist()
        else:
            accepted, nxt = self._accept_sampled(drafts, draft_logits, logits)
        engine.accept(torch.tensor(accepted) + 1, active)
        drafts = drafts.tolist()
        new = [drafts[b][: accepted[b]] + [nxt[b]] for b in range(len(drafts))]
        for b in range(len(new)):
            if active is None or active[b]:
                self.stats.passes += 1
                self.stats.drafted += k
                self.stats.accepted += accepted[b]
                self.stats.produced += accepted[b] + 1
        return new, logits

    def _accept_sampled(self, drafts, draft_logits, logits) -> tuple[list[int], list[int]]:
        """The speculative sampling rule, row by row with the row's generator: accept draft d with probability
        min(1, p(d) / q(d)); at the first rejection sample from max(0, p - q) (normalized), else from p after
        the last draft."""
        p = self._filtered(logits).softmax(-1).cpu()  # [B, k+1, V]
        q = self._filtered(draft_logits).softmax(-1).cpu()  # [B, k, V]
        drafts = drafts.cpu()
        accepted, nxt = [], []
        for b, g in enumerate(self.generators):
            a = 0
            while a < self.k:
                d = drafts[b, a]
                if float(torch.rand(1, generator=g)) * q[b, a, d] >= p[b, a, d]:
                    break
                a += 1
            weights = p[b, a]
            if a < self.k:
                residual = (p[b, a] - q[b, a]).clamp(min=0)
                weights = residual if float(residual.sum()) > 0 else weights
            accepted.append(a)
            nxt.append(int(torch.multinomial(weights, 1, generator=g)))
        return accepted, nxt
