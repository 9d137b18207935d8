"""Key/value caches for incremental decoding, one per stack (all its layers share the positions).

A row keeps `size` slots: a ring buffer over its last `size` positions for a sliding-window stack
(the entropy model, the local encoder and decoder: memory does not grow with the text), or, with
size=None, one slot per position that grows as the row does (the global transformer: one entry per
patch). Rows move independently, so a batch of prompts of different lengths decodes together.

Attention calls `cache.layer(i).update(k, v)`:
- after `prefill(lengths)`, k/v hold a whole right-padded sequence: each row stores its last `size`
  positions and attention proceeds over the sequence itself;
- after `step(positions, rows)`, k/v hold one new position per selected row: it is written to its
  slot and attention reads the row's slots, under the mask `step` returned.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, size: int | None, device, dtype):
        self.size = size
        capacity = size or 64
        self.pos = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)  # entries per row (growing mode)
        self.k = [torch.zeros(batch, capacity, n_kv_heads, head_dim, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self._write = None  # what `update` does: ("prefill", rows, positions, slots) or ("step", rows, slots)

    def _grow(self, needed: int) -> None:
        capacity = self.pos.shape[1]
        if self.size is not None or needed <= capacity:
            return
        new = max(needed, 2 * capacity)
        self.pos = torch.nn.functional.pad(self.pos, (0, new - capacity), value=-1)
        self.k = [torch.nn.functional.pad(t, (0, 0, 0, 0, 0, new - capacity)) for t in self.k]
        self.v = [torch.nn.functional.pad(t, (0, 0, 0, 0, 0, new - capacity)) for t in self.v]

    def prefill(self, lengths: torch.Tensor) -> None:
        """The next `update` of every layer carries positions 0..T-1; row b keeps the last `size` of its `lengths[b]`."""
        device = self.pos.device
        lengths = lengths.to(device)
        self._grow(int(lengths.max()))
        keep = lengths.clamp(max=self.size) if self.size is not None else lengths
        rows = torch.repeat_interleave(torch.arange(len(lengths), device=device), keep)
        offsets = torch.arange(int(keep.sum()), device=device) - torch.repeat_interleave(keep.cumsum(0) - keep, keep)
        positions = torch.repeat_interleave(lengths - keep, keep) + offsets
        slots = positions % self.size if self.size is not None else positions
        self.pos[rows, slots] = positions
        self.count = lengths.clone()
        self._write = ("prefill", rows, positions, slots)

    def step(self, positions: torch.Tensor, rows: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
        """One new position per row of `rows` (sorted; default: all); returns their attention mask
        [n, 1, 1, S]. A growing cache attends only to its filled slots, not its spare capacity."""
        batch = self.pos.shape[0]
        every_row = rows is None or len(rows) == batch  # `rows` is sorted and unique
        if rows is None:
            rows = torch.arange(batch, device=self.pos.device)
        if self.size is None:
            slots = self.count[rows]
            self._grow(int(slots.max()) + 1)
            self.count[rows] += 1
            used = int(self.count[rows].max())
        else:
            slots = positions % self.size
            used = self.pos.shape[1]
        self.pos[rows, slots] = positions
        self._write = ("step", rows, slots, every_row, used)
        seen = (self.pos if every_row else self.pos[rows])[:, :used]  # [n, S]
        mask = (seen >= 0) & (seen <= positions[:, None])
        if window is not None:
            mask &= seen > positions[:, None] - window
        return mask[:, None, None, :]

    def layer(self, i: int) -> "_LayerCache":
        return _LayerCache(self, i)


class _LayerCache:
    def __init__(self, cache: KVCache, i: int):
        self.cache, self.i = cache, i

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, i = self.cache, self.i
        if c._write[0] == "prefill":
            _, rows, positions, slots = c._write
            c.k[i][rows, slots] = k[rows, positions].to(c.k[i].dtype)
            c.v[i][rows, slots] = v[rows, positions].to(c.v[i].dtype)
            return k, v
        _, rows, slots, every_row, used = c._write
        c.k[i][rows, slots] = k[:, 0]
        c.v[i][rows, slots] = v[:, 0]
        if every_row:
            return c.k[i][:, :used], c.v[i][:, :used]
        return c.k[i][rows, :used], c.v[i][rows, :used]
