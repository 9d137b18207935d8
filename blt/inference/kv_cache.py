"""Key/value caches for incremental decoding, one per stack (all its layers share the positions).

Two kinds, both keeping every row of a batch on its own clock (prompts of different lengths decode together):
- `WindowCache`: a ring buffer over each row's last `size` positions, for a sliding-window stack (the entropy
  model, the local encoder and decoder): memory does not grow with the text.
- `GrowingCache`: one slot per position, growing as the rows do, for the global transformer (one entry per patch).

Attention calls `cache.layer(i).update(k, v)`, and what that does is the cache's pending write:
- after `prefill(lengths)`, k/v hold a whole right-padded sequence: each row stores its last positions and
  attention proceeds over the sequence itself;
- after `step(positions)`, k/v hold one new position per row: it is written to its slot and attention reads
  the row's slots, under the mask `step` returned. A `store` mask keeps some rows' positions out of the cache
  (the global cache of a row whose patch did not close): their attention output is meaningless and dropped.

A step reads no tensor of a window cache or of a `GrowingCache` made with `static=True`, and changes no shape
(a static cache grows between steps, by `reserve`), so a compiled step runs one graph at every position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillWrite:
    """Store k/v[rows, positions] in slots[...] (flat, one entry per kept position)."""

    rows: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor


@dataclass
class StepWrite:
    """Store the one new k/v of every row in its slot; attend to the first `used` slots."""

    slots: torch.Tensor
    used: int


class KVCache:
    """What both kinds share: per-layer key/value buffers, head-major [B, Hkv, S, hd] (each head's slots
    contiguous: a step reads 1,024 of them in half the time it takes over [B, S, Hkv, hd]), the position held by
    each slot (-1: empty), and the pending write."""

    transient = ("pending",)  # set and consumed within one step part: not part of the state a compiled part takes

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, capacity: int, device, dtype):
        self.pos = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        self.k = [
            torch.zeros(batch, n_kv_heads, capacity, head_dim, device=device, dtype=dtype) for _ in range(n_layers)
        ]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.rows = torch.arange(batch, device=device)
        self.pending: PrefillWrite | StepWrite | None = None

    def _keep(self, lengths: torch.Tensor) -> torch.Tensor:
        """How many of its `lengths` positions each row keeps (and room made for them)."""
        raise NotImplementedError

    def _prefill_slots(self, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _step_slots(self, positions: torch.Tensor, store: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """Slots of one new position per row, and how many slots attention reads."""
        raise NotImplementedError

    def prefill(self, lengths: torch.Tensor) -> None:
        """The next `update` of every layer carries positions 0..T-1; row b keeps the last of its `lengths[b]`."""
        device = self.pos.device
        lengths = lengths.to(device)
        keep = self._keep(lengths)
        rows = torch.repeat_interleave(torch.arange(len(lengths), device=device), keep)
        offsets = torch.arange(int(keep.sum()), device=device) - torch.repeat_interleave(keep.cumsum(0) - keep, keep)
        positions = torch.repeat_interleave(lengths - keep, keep) + offsets
        slots = self._prefill_slots(positions)
        self.pos[rows, slots] = positions
        self.pending = PrefillWrite(rows, positions, slots)

    def step(
        self, positions: torch.Tensor, window: int | None = None, store: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One new position per row (kept where `store` [B] holds; default: every row) -> the rows' attention
        mask [B, 1, 1, S]."""
        slots, used = self._step_slots(positions, store)
        kept = positions if store is None else torch.where(store, positions, self.pos[self.rows, slots])
        self.pos[self.rows, slots] = kept
        self.pending = StepWrite(slots, used)
        seen = self.pos[:, :used]  # [B, S]
        mask = (seen >= 0) & (seen <= positions[:, None])
        if window is not None:
            mask &= seen > positions[:, None] - window
        return mask[:, None, None, :]

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's new keys/values [B, T, Hkv, hd] -> those its attention reads: after `prefill`, `k` and `v`
        themselves; after `step`, the slots read, head-major [B, Hkv, S, hd]."""
        w = self.pending
        if isinstance(w, PrefillWrite):
            self.k[i][w.rows, :, w.slots] = k[w.rows, w.positions].to(self.k[i].dtype)
            self.v[i][w.rows, :, w.slots] = v[w.rows, w.positions].to(self.v[i].dtype)
            return k, v
        self.k[i][self.rows, :, w.slots] = k[:, 0]
        self.v[i][self.rows, :, w.slots] = v[:, 0]
        return self.k[i][:, :, : w.used], self.v[i][:, :, : w.used]

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self, i)

    def context(self) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """What attention may read: the positions held [B, S] (-1: empty) and each layer's keys and values
        [B, S, Hkv, hd] (views; speculative verification attends over these and the new positions together)."""
        return self.pos, [t.transpose(1, 2) for t in self.k], [t.transpose(1, 2) for t in self.v]

    def write(self, rows: torch.Tensor, positions: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor]):
        """Store each layer's keys/values ks[i], vs[i] [n, Hkv, hd] of `positions` [n] of `rows` [n] (the bytes
        a speculative pass kept). A row's positions follow the ones it holds."""
        slots = self._write_slots(rows, positions)
        self.pos[rows, slots] = positions
        for i in range(len(self.k)):
            self.k[i][rows, :, slots] = ks[i].to(self.k[i].dtype)
            self.v[i][rows, :, slots] = vs[i].to(self.v[i].dtype)

    def _write_slots(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---- rows joining and leaving a running batch (continuous batching) ----------------------------
    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` [n] (indices into the batch, in their new order)."""
        self.pos = self.pos[rows]
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]
        self.rows = torch.arange(len(rows), device=self.pos.device)
        self.pending = None

    def add_rows(self, other: KVCache) -> None:
        """Append the rows of `other` (a cache of the same stack, the same number of slots) after this batch's."""
        self.pos = torch.cat([self.pos, other.pos])
        self.k = [torch.cat(pair) for pair in zip(self.k, other.k)]
        self.v = [torch.cat(pair) for pair in zip(self.v, other.v)]
        self.rows = torch.arange(len(self.pos), device=self.pos.device)
        self.pending = None


@dataclass
class LayerCache:
    """The view one attention layer gets: `update(k, v)` as the cache's layer `i`."""

    cache: KVCache
    i: int

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(self.i, k, v)


class WindowCache(KVCache):
    """A ring buffer over each row's last `size` positions: position p lives in slot p % size."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, size: int, device, dtype):
        super().__init__(n_layers, batch, n_kv_heads, head_dim, size, device, dtype)
        self.size = size

    def _keep(self, lengths):
        return lengths.clamp(max=self.size)

    def _prefill_slots(self, positions):
        return positions % self.size

    def _step_slots(self, positions, store):
        return positions % self.size, self.size

    def _write_slots(self, rows, positions):
        return positions % self.size


class GrowingCache(KVCache):
    """One slot per position, in order. Attention reads only the filled slots, and capacity doubles when full.

    `static`: a step reads no tensor and never grows the cache, so that a compiled step runs one graph however
    many patches there are. The caller says before a step how many slots it may fill (`reserve`), and attention
    reads that many: their number is the length of `live` (an empty [slots] tensor), a tensor size that a compiled
    graph takes as dynamic, where a Python int would be baked in."""

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        device,
        dtype,
        capacity: int = 64,
        static: bool = False,
    ):
        super().__init__(n_layers, batch, n_kv_heads, head_dim, capacity, device, dtype)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)  # filled slots per row
        self.static = static
        self.live = torch.empty(0, dtype=torch.uint8, device=device)

    def _grow(self, needed: int) -> None:
        capacity = self.pos.shape[1]
        if needed > capacity:
            self._resize(max(needed, 2 * capacity))

    def reserve(self, slots: int) -> None:
        """Before a step of a static cache: room for `slots` slots per row (doubling), and attention over that many
        (at least 2: a graph traced with 1 would take it as a constant)."""
        slots = max(2, slots)
        self._grow(slots)
        if len(self.live) != slots:
            self.live = torch.empty(slots, dtype=torch.uint8, device=self.pos.device)

    def _resize(self, slots: int) -> None:
        """Pad every row to `slots` slots, the new ones empty."""
        extra = slots - self.pos.shape[1]
        self.pos = F.pad(self.pos, (0, extra), value=-1)
        self.k = [F.pad(t, (0, 0, 0, extra)) for t in self.k]
        self.v = [F.pad(t, (0, 0, 0, extra)) for t in self.v]

    def _keep(self, lengths):
        self._grow(int(lengths.max()))
        self.count = lengths.clone()
        return lengths

    def _prefill_slots(self, positions):
        return positions

    def _step_slots(self, positions, store):
        slots = self.count.clone()
        self.count += 1 if store is None else store.long()
        if self.static:  # every row's next slot is among the `live` ones: `reserve` made room
            return slots, self.live.shape[0]
        self._grow(int(slots.max()) + 1)
        return slots, int(self.count.max())

    def context(self):
        used = int(self.count.max())
        return (
            self.pos[:, :used],
            [t[:, :, :used].transpose(1, 2) for t in self.k],
            [t[:, :, :used].transpose(1, 2) for t in self.v],
        )

    def keep_rows(self, rows):
        super().keep_rows(rows)
        self.count = self.count[rows]

    def add_rows(self, other):
        capacity = max(self.pos.shape[1], other.pos.shape[1])  # the same number of slots in both first
        for cache in (self, other):
            if cache.pos.shape[1] < capacity:
                cache._resize(capacity)
        super().add_rows(other)
        self.count = torch.cat([self.count, other.count])

    def _write_slots(self, rows, positions):  # slot = position: the rows hold positions 0..count-1
        if len(positions):
            self._grow(int(positions.max()) + 1)
            self.count.scatter_reduce_(0, rows, positions + 1, "amax")
        return positions


def stack_cache(
    n_layers: int, batch: int, n_kv_heads: int, head_dim: int, window: int | None, device, dtype
) -> KVCache:
    """The cache of a stack whose self-attention sees `window` positions (None: all of them)."""
    if window is None:
        return GrowingCache(n_layers, batch, n_kv_heads, head_dim, device, dtype)
    return WindowCache(n_layers, batch, n_kv_heads, head_dim, window, device, dtype)
