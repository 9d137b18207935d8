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

import types
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import partial

import torch
import torch._dynamo
import torch.fx.experimental._config as fx_config
import torch.nn.functional as F
from torch._inductor.runtime.cache_dir_utils import cache_dir

from blt.errors import BltError
from blt.inference.aot import CompiledPart
from blt.inference.kv_cache import GrowingCache, KVCache, stack_cache
from blt.model.blt import BLT, check_ids
from blt.model.entropy_model import entropy
from blt.model.hash_embeddings import HASH_PRIMES, _powers
from blt.model.masks import sequence_self_mask
from blt.model.patching import EntropyPatcher, limit_patch_length
from blt.model.transformer import FusedBlock, additive_mask, attend_step, block_step, rms, step_rotation
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
    open: list[torch.Tensor]  # per encoder cross-attention layer: states of each row's open patch [B, capacity, D]
    open_len: torch.Tensor  # [B] bytes in each row's open patch (the first open_len[b] entries of open[.][b])
    entropy_cache: KVCache | None  # a WindowCache for a windowed stack, else a GrowingCache
    encoder_cache: KVCache
    decoder_cache: KVCache
    global_cache: GrowingCache


def compiled(fn, device_type: str):
    """`fn` (a function of the engine and tensors) under `torch.compile`, as a copy of its own: a step part's graph
    is traced once per engine signature (`IncrementalBLT.signature`) and then runs without guards. This is the path
    of a GPU, and of a CPU where compiling ahead of time (`blt.inference.aot`, less overhead per call) fails.

    Checking dynamo's guards costs more than a small step's arithmetic on a CPU (30-60 us a call), so they are
    dropped (`skip_all_guards_unsafe`). That is safe only because nothing a graph assumed can change under it:
    each copy of `fn` (a fresh code object, so a cache of its own) serves one model and one signature (its modules,
    batch size, dtype, device, the patcher's settings); the sizes that do change between steps (the open-patch
    buffers and the global cache, which grow) are marked dynamic before the trace; everything else has fixed
    shapes. On a CPU the graph's wrapper is C++ (`cpp_wrapper`); on a GPU, CUDA graphs replay it ("reduce-overhead").

    Where torch.compile cannot work (a Python version dynamo does not support, or no C++ compiler for
    inductor), `fn` runs eagerly, with a warning: the output is the same, only slower."""
    if not torch._dynamo.is_dynamo_supported():
        warnings.warn("torch.compile is not supported here (see torch._dynamo.is_dynamo_supported); decoding eagerly")
        return fn
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    options = {"guard_filter_fn": torch.compiler.skip_all_guards_unsafe}
    if device_type == "cpu":
        options["cpp_wrapper"] = True
    mode = "reduce-overhead" if device_type == "cuda" else None
    graph = torch.compile(copy, fullgraph=True, dynamic=False, mode=mode, options=options)
    traced, failed = False, False

    def run(*args):
        nonlocal traced, failed
        if not failed:
            try:
                if traced:
                    return graph(*args)
                with fx_config.patch(use_duck_shape=False):  # dynamic sizes equal at the trace stay apart
                    out = graph(*args)
                traced = True
                return out
            except torch._dynamo.exc.BackendCompilerFailed as e:  # raised before the graph runs: nothing half done
                failed = True
                warnings.warn(f"torch.compile failed ({str(e).splitlines()[0]}); decoding eagerly")
        return fn(*args)

    return run


# the compiled step parts of each model, by engine signature and part (they outlive an engine: a model compiles once)
_GRAPHS: weakref.WeakKeyDictionary[BLT, dict] = weakref.WeakKeyDictionary()


class IncrementalBLT:
    """Prefill and one-byte steps of a batch of rows for one BLT; `state` is set by `prefill`."""

    # the engine's own tensors a step part reads besides the model's weights and the state: inference copies made
    # by `_prepare_step` and the row indices (a compiled part takes them as inputs, see `blt.inference.aot`)
    STEP_CONSTANTS = ("rows", "hash_powers", "cross_weights", "enc_blocks", "dec_blocks", "glb_blocks", "em_blocks")

    def __init__(self, model: BLT, compile: bool = False):
        if model.patcher is None:
            raise BltError("generation needs the model's patcher (an entropy model for entropy patching)")
        self.model = model
        self.config = model.config
        self.patcher = model.patcher
        hash_embeddings = model.local_encoder.hash_embeddings
        self.hash_history = hash_embeddings.history if hash_embeddings is not None else 0
        self.state: DecodingState | None = None
        self.compile = compile
        self.graphs = _GRAPHS.setdefault(model, {}) if compile else None
        self.signature: tuple = ()
        self.signature_graphs: dict = {}  # this signature's compiled parts, by part (found once per signature)
        self.compiled_inputs: dict = {}  # per compiled part: the weights and constants it takes (see `aot`)
        self.byte_part, self.close_part, self.decoder_part = self._byte_part, self._close_part, self._decoder_part
        if compile:
            self.byte_part, self.close_part, self.decoder_part = (
                partial(self._compiled_part, type(self)._byte_part),
                partial(self._compiled_part, type(self)._close_part),
                partial(self._compiled_part, type(self)._decoder_part),
            )

    def _compiled_part(self, fn, *args):
        """Run a step part's compiled code (one per signature, compiled on first use)."""
        graph = self.signature_graphs.get(fn.__qualname__)
        if graph is None:
            graph = self.signature_graphs[fn.__qualname__] = self._compile(fn, args)
        return graph(self, *args)

    def _compile(self, fn, args):
        """A step part compiled for this signature: ahead of time on a CPU (`blt.inference.aot`, the least
        overhead per call), else (or should that fail) under `torch.compile` (`compiled`)."""
        device_type = self.rows.device.type
        try:
            cache_dir()  # both paths keep what they compile there (TORCHINDUCTOR_CACHE_DIR)
        except OSError as e:
            warnings.warn(f"torch's compile cache folder cannot be used ({e}); decoding eagerly")
            return fn
        if device_type == "cpu" and torch._dynamo.is_dynamo_supported():
            try:
                return CompiledPart(self, fn, args)
            except Exception as e:  # export or AOTInductor could not: torch.compile runs the same part
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                warnings.warn(f"compiling {fn.__name__} ahead of time failed ({why}); using torch.compile")
        for t, dim in self.growing_sizes():
            torch._dynamo.mark_dynamic(t, dim)
        return compiled(fn, device_type)

    def growing_sizes(self) -> list[tuple[torch.Tensor, int]]:
        """The sizes that grow between steps, dynamic in a compiled part: the open-patch buffers' capacity and the
        global cache's slots, as (tensor, dimension)."""
        s = self.state
        g = s.global_cache
        return [
            *[(t, 1) for t in [*s.open, g.pos]],
            *[(t, 2) for t in [*g.k, *g.v]],  # [B, Hkv, S, hd]
            (g.live, 0),
        ]

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
            c.n_layers_global,
            batch,
            n_kv_global,
            c.dim_global // c.n_heads_global,
            device,
            dtype,
            static=self.compile,
        )
        encoder_cache.prefill(lengths)
        num_patches = int(patch_of[:, -1].max()) + 1
        h, patch_vectors, states = enc(ids, patch_of[:, :-1], num_patches, self_mask, cache=encoder_cache)
        n_closed = int(closed.max())
        global_cache.prefill(closed)
        if global_cache.static:
            global_cache.reserve(n_closed + 1)
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
            open=[],
            open_len=torch.where(opens, 0, lengths - patch_start),
            entropy_cache=entropy_cache,
            encoder_cache=encoder_cache,
            decoder_cache=decoder_cache,
            global_cache=global_cache,
        )
        # the open patch's byte states after each cross-attention layer, in buffers [B, capacity, D]
        st = self.state
        capacity = max(16, int(st.open_len.max()) + 1)  # grows by doubling (`_room_for_one_more`)
        for layer_states in states:
            buf = layer_states.new_zeros(batch, capacity, layer_states.shape[-1])
            for b in range(batch):
                n = int(st.open_len[b])
                buf[b, :n] = layer_states[b, lengths[b] - n : lengths[b]]
            st.open.append(buf)
        self.open_bound = int(st.open_len.max())  # an upper bound of open_len, kept without reading it
        self._prepare_step()
        return logits

    @staticmethod
    def _tail(ids: torch.Tensor, n: int) -> torch.Tensor:
        """The last `n` ids, left-padded with id 0 as the hash n-grams pad."""
        tail = ids[-n:]
        return torch.cat([torch.full((n - len(tail),), BOE_ID, dtype=ids.dtype, device=ids.device), tail])

    # ---- one byte per row ----------------------------------------------------------------------------
    def _prepare_step(self) -> None:
        """Inference copies for the steps: fused blocks, the hash powers, views of the decoder's patch keys."""
        m, s = self.model, self.state
        device = s.positions.device
        self.enc_blocks = [FusedBlock(b) for b in m.local_encoder.layers]
        self.dec_blocks = [FusedBlock(b) for b in m.local_decoder.layers]
        self.glb_blocks = [FusedBlock(b) for b in m.global_transformer.layers]
        self.em_blocks = None
        if isinstance(self.patcher, EntropyPatcher):
            self.em_blocks = [FusedBlock(b) for b in self.patcher.entropy_model.layers]
        self.dtype = m.local_encoder.tok_embeddings.weight.dtype
        self.hash_powers = self._hash_powers(device)
        self._rows_changed()
        self.cross_weights = [
            (x.attn.wq.weight.detach().t(), x.attn.wo.weight.detach().t()) for x in m.local_decoder.cross_attn
        ]

    def _hash_powers(self, device) -> torch.Tensor | None:
        """[n_tables, n+1] int64: the prime powers of each (function, n) table over the last n+1 ids (0 before
        the n-gram), so that every table's hash of the newest n-gram is one row of a single product-sum."""
        hashing = self.model.local_encoder.hash_embeddings
        if hashing is None:
            return None
        width = self.hash_history + 1
        rows = []
        for f in range(hashing.n_functions):
            for n in hashing.ngram_sizes:
                row = torch.zeros(width, dtype=torch.int64, device=device)
                row[width - n :] = _powers(HASH_PRIMES[f], n, device)
                rows.append(row)
        return torch.stack(rows)

    def _embed(self, history: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Byte + hash n-gram embeddings of n new ids per row [B, n] after `history` [B, >= n-gram - 1] -> [B, n, D]
        (as `LocalEncoder.embed`); each table's hash of an n-gram is one row of a product-sum."""
        enc = self.model.local_encoder
        h = enc.tok_embeddings(ids)
        if self.hash_powers is None:
            return h
        width = self.hash_powers.shape[1]
        windows = torch.cat([history[:, history.shape[1] - (width - 1) :], ids], 1).unfold(1, width, 1)  # [B, n, w]
        hashes = (windows[:, :, None, :] * self.hash_powers).sum(-1) % enc.hash_embeddings.table_size
        tables = enc.hash_embeddings.tables
        out = tables[0](hashes[..., 0])
        for j in range(1, len(tables)):
            out = out + tables[j](hashes[..., j])
        return h + out

    @staticmethod
    def _run_blocks(blocks, h, rotation, mask, cache, keep=None):
        kept = []
        for i, b in enumerate(blocks):
            h = block_step(b, h, rotation, mask, cache.layer(i))
            if keep is not None and keep(i):
                kept.append(h)
        return h, kept

    @torch.no_grad()
    def step(self, next_ids: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Feed one id per row -> the next logits [B, V]. Rows not `active` (finished) still move
        along but cannot fail.

        Three parts with static shapes (`byte_part`, `close_part`, `decoder_part`; compiled when the engine was made
        with `compile=True`); the middle one, the per-patch work, runs only when some row closes a patch."""
        self._room_for_one_more()
        h, closing = self.byte_part(next_ids.to(self.rows.device))
        if bool(closing.any()):
            full = closing & (self.state.n_patches >= self.config.max_seqlen)
            if bool((full if active is None else full & active.to(full.device)).any()):
                raise BltError(
                    f"the text reached the global transformer's context of {self.config.max_seqlen} patches "
                    "(max_seqlen)"
                )
            if self.state.global_cache.static:  # the slots it may fill, which its attention reads
                self.state.global_cache.reserve(int(self.state.n_patches.max()) + 1)
            self.close_part(closing & ~full)  # a finished row that is full closes no more patches
        return self.decoder_part(h)

    def _byte_part(self, next_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Entropy model, patch rule and local encoder for one new id per row -> the encoder output [B, D]
        and whether the byte after this one opens a patch [B]; the byte joins its row's open patch."""
        m, c, s = self.model, self.config, self.state
        pos = s.positions
        prev_id, cur_id = s.history[:, -1], next_ids
        window, h_dtype = c.local_attention_window_len, self.dtype

        # does the byte after this one open a patch? (the same rule as over a whole sequence)
        if self.em_blocks is not None:
            em = self.patcher.entropy_model
            mask = s.entropy_cache.step(pos, window=em.config.sliding_window)
            h, _ = self._run_blocks(
                self.em_blocks,
                em.tok_embeddings(next_ids),
                step_rotation(em.rope, pos),
                additive_mask(mask, h_dtype),
                s.entropy_cache,
            )
            s.prev_entropy, s.cur_entropy = s.cur_entropy, entropy(em.output(em.norm(h)))
        q = pos + 1
        natural = self.patcher.rule(prev_id, cur_id, s.prev_entropy, s.cur_entropy, q)
        natural = torch.as_tensor(natural, device=pos.device).expand_as(q) | (q <= 1)
        s.last_start = torch.where(natural, q, s.last_start)
        limit = self.patcher.max_patch_length
        opens_next = natural | ((q - s.last_start) % limit == 0) if limit else natural

        # local encoder: this byte's states join its (open) patch, in the fixed open-patch buffers
        enc = m.local_encoder
        mask = s.encoder_cache.step(pos, window=window)
        h, states = self._run_blocks(
            self.enc_blocks,
            self._embed(s.history, next_ids[:, None])[:, 0],
            step_rotation(enc.rope, pos),
            additive_mask(mask, h_dtype),
            s.encoder_cache,
            keep=enc.has_cross_attn,
        )
        s.history = torch.cat([s.history[:, 1:], next_ids[:, None]], dim=1)
        for buf, st in zip(s.open, states):
            buf[self.rows, s.open_len] = st
        s.open_len += 1
        return h, opens_next

    def _decoder_part(self, h: torch.Tensor) -> torch.Tensor:
        """Local decoder for the newest byte of every row (encoder output `h` [B, D]) -> next logits [B, V]:
        cross-attention to the row's last closed patch, then the block, on every layer."""
        m, c, s = self.model, self.config, self.state
        pos, dec = s.positions, m.local_decoder
        mask = additive_mask(s.decoder_cache.step(pos, window=c.local_attention_window_len), self.dtype)
        rotation = step_rotation(dec.rope, pos)
        for i, b in enumerate(self.dec_blocks):
            if dec.has_cross_attn(i):
                j = i if dec.cross_all_layers else 0
                cross, (wq, wo) = dec.cross_attn[j], self.cross_weights[j]
                query = torch.mm(rms(cross.q_norm, h), wq).unflatten(-1, (cross.attn.n_heads, -1))  # [B, H, hd]
                k, v = s.read_kv[j]  # [B, 1, k, H, hd] -> [B, H, k, hd] as sdpa reads them
                h = h + (h + torch.mm(attend_step(query, k[:, 0].transpose(1, 2), v[:, 0].transpose(1, 2)), wo))
            h = block_step(b, h, rotation, mask, s.decoder_cache.layer(i))
        s.positions = pos + 1
        return dec.output(dec.norm(h))

    def _room_for_one_more(self) -> None:
        """Grow the open-patch buffers (doubling) if a row's patch could outgrow them this step."""
        s = self.state
        self.open_bound += 1  # after this step's byte
        if self.open_bound <= s.open[0].shape[1]:
            return
        self.open_bound = int(s.open_len.max()) + 1
        if self.open_bound > s.open[0].shape[1]:
            s.open = [F.pad(buf, (0, 0, 0, buf.shape[1])) for buf in s.open]

    def _close_part(self, closing: torch.Tensor) -> None:
        """For the rows where `closing` [B] holds: pool the open patch, one global step, new decoder keys.
        Every row is computed (static shapes); the others keep their state."""
        m, s = self.model, self.state
        vectors = self._pool_open()
        glb, positions = m.global_transformer, s.n_patches
        mask = s.global_cache.step(positions, store=closing)
        h = vectors if glb.in_proj is None else glb.in_proj(vectors)
        mask = additive_mask(mask, h.dtype)
        out, _ = self._run_blocks(self.glb_blocks, h, step_rotation(glb.rope, positions), mask, s.global_cache)
        for j, (k, v) in enumerate(m.local_decoder.patch_kv(out[:, None])):
            rk, rv = s.read_kv[j]
            rk.copy_(torch.where(closing[:, None, None, None, None], k, rk))
            rv.copy_(torch.where(closing[:, None, None, None, None], v, rv))
        s.n_patches += closing.long()
        s.open_len.masked_fill_(closing, 0)

    def _pool_open(self) -> torch.Tensor:
        """`LocalEncoder.pool_patches` of each row's open patch (its first `open_len` entries of the open-patch
        buffers) -> [B, k*D]: the max over its bytes, projected to k queries that attend to its bytes in each
        cross-attention layer. Masked over the buffers rather than scattered, which costs a step far less."""
        enc, s = self.model.local_encoder, self.state
        outside = torch.arange(s.open[0].shape[1], device=s.open_len.device) >= s.open_len[:, None]  # [B, capacity]
        pooled = s.open[0].masked_fill(outside[:, :, None], float("-inf")).amax(1)
        queries = enc.patch_projection(pooled).unflatten(-1, (enc.k, -1))  # [B, k, D]
        for cross, h in zip(enc.cross_attn, s.open):
            q = cross.attn.project_q(cross.q_norm(queries))  # [B, k, H, hd]
            keys, values = cross.project_kv(h)  # [B, capacity, H, hd]
            scores = torch.einsum("bnhd,bthd->bhnt", q.float(), keys.float()) * q.shape[-1] ** -0.5
            weights = scores.masked_fill(outside[:, None, None], float("-inf")).softmax(-1)
            out = torch.einsum("bhnt,bthd->bnhd", weights, values.float()).type_as(q)
            queries = queries + (queries + cross.attn.wo(out.flatten(-2)))  # the release's doubled residual
        return queries.flatten(1)

    # ---- rows joining and leaving a running batch (continuous batching, `blt.inference.batching`) -----
    @torch.no_grad()
    def add_rows(self, rows: Sequence[torch.Tensor]) -> torch.Tensor:
        """Prefill `rows` (ids, BOS first) on their own and append them to the running batch -> their next-byte
        logits [n, V]. Every row keeps its own clock, caches and patches, so a row decodes in a batch exactly as
        it would alone. Before any `prefill` this is `prefill`; after, the steps' copies of the weights are kept."""
        if self.state is None:
            return self.prefill(rows)
        joining = _PrefillOnly(self.model)
        logits = joining.prefill(rows)
        if len(self.state.positions) == 0:  # every row had left: the new rows are the batch
            self.state, self.open_bound = joining.state, joining.open_bound
        else:
            s, t = self.state, joining.state
            for f in fields(s):
                setattr(s, f.name, _cat_rows(getattr(s, f.name), getattr(t, f.name)))
            self.open_bound = max(self.open_bound, joining.open_bound)
        self._rows_changed()
        return logits

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` [n] (indices into the running batch, in their new order): the others leave it."""
        s = self.state
        rows = rows.to(s.positions.device)
        for f in fields(s):
            setattr(s, f.name, _take_rows(getattr(s, f.name), rows))
        self._rows_changed()

    def _rows_changed(self) -> None:
        """What the steps derive from the batch's rows (their indices, the signature of the compiled graphs); after a
        prefill and whenever rows join or leave."""
        s = self.state
        self.rows = torch.arange(len(s.positions), device=s.positions.device)
        self.compiled_inputs = {}
        settings = sorted((k, v) for k, v in vars(self.patcher).items() if isinstance(v, (bool, int, float, str)))
        # the modules themselves: one replaced on the model (an ablation, say) is other code and other weights
        modules = tuple(id(m) for root in [self.model, *self.patcher.modules()] for m in root.modules())
        # what a compiled part's graph may take as fixed (see `compiled`)
        self.signature = (type(self).__name__, len(s.positions), str(self.dtype), str(self.rows.device),
                          repr(self.config), type(self.patcher).__name__, tuple(settings), modules)  # fmt: skip
        if self.graphs is not None:  # looked up here, not at every step: the signature is long to hash
            self.signature_graphs = self.graphs.setdefault(self.signature, {})


class _PrefillOnly(IncrementalBLT):
    """The prefill of rows about to join a running batch: the steps' copies (fused weights) are the batch's."""

    def _prepare_step(self) -> None:
        pass


def _take_rows(x, rows: torch.Tensor):
    """A `DecodingState` field with only `rows` of the batch."""
    if x is None:
        return None
    if isinstance(x, KVCache):
        x.keep_rows(rows)
        return x
    if isinstance(x, (list, tuple)):
        return type(x)(_take_rows(e, rows) for e in x)
    return x[rows]


def _cat_rows(x, y):
    """A `DecodingState` field of a running batch followed by the same field of rows joining it. Tensors are
    zero-padded to the same size past the batch dimension first (the open-patch buffers may differ in capacity)."""
    if x is None:
        return None
    if isinstance(x, KVCache):
        x.add_rows(y)
        return x
    if isinstance(x, (list, tuple)):
        return type(x)(_cat_rows(a, b) for a, b in zip(x, y))
    size = [max(a, b) for a, b in zip(x.shape, y.shape)]

    def pad(t: torch.Tensor) -> torch.Tensor:
        widths = []  # F.pad's order: the last dimension first
        for d in reversed(range(1, t.dim())):
            widths += [0, size[d] - t.shape[d]]
        return F.pad(t, widths)

    return torch.cat([pad(x), pad(y)])
