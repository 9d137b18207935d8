"""Attention masks, each built by one small function. True means "may attend".

Self-attention masks are [B, 1, Tq, Tk] booleans built from absolute positions, so the same functions
serve a full forward pass and a decoding step against a cache. Patch cross-attention masks say which
bytes belong to which patch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from blt.tokenizer import EOS_ID


def document_ids(ids: torch.Tensor, eos_id: int = EOS_ID) -> torch.Tensor:
    """Index of the document each position belongs to [B, T]; a document ends with its EOS."""
    is_eos = (ids == eos_id).long()
    return is_eos.cumsum(-1) - is_eos


def causal(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """[..., Tq, Tk]: a query sees keys at its own position or before."""
    return k_pos.unsqueeze(-2) <= q_pos.unsqueeze(-1)


def sliding_window(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """[..., Tq, Tk]: a query sees the `window` most recent positions, itself included."""
    return k_pos.unsqueeze(-2) > q_pos.unsqueeze(-1) - window


def same_document(q_doc: torch.Tensor, k_doc: torch.Tensor) -> torch.Tensor:
    """[B, Tq, Tk]: no attention across document boundaries in packed sequences."""
    return q_doc.unsqueeze(-1) == k_doc.unsqueeze(-2)


def self_attention_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor | None = None,
    window: int | None = None,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal mask, optionally windowed and split by documents -> [B or 1, 1, Tq, Tk].

    Positions are [Tq] / [Tk] (shared by the batch) or [B, Tq] / [B, Tk]; documents are [B, Tq] / [B, Tk].
    """
    k_pos = q_pos if k_pos is None else k_pos
    mask = causal(q_pos, k_pos)
    if window is not None:
        mask = mask & sliding_window(q_pos, k_pos, window)
    if q_doc is not None:
        mask = mask & same_document(q_doc, q_doc if k_doc is None else k_doc)
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    return mask.unsqueeze(1)


def encoder_cross_mask(byte_patch_ids: torch.Tensor, num_patches: int, k: int) -> torch.Tensor:
    """[B, 1, P*k, T]: each of a patch's k queries sees exactly the bytes of that patch."""
    patches = torch.arange(num_patches, device=byte_patch_ids.device)
    mask = patches[None, :, None] == byte_patch_ids[:, None, :]  # [B, P, T]
    return mask.repeat_interleave(k, dim=1).unsqueeze(1)


def decoder_cross_mask(byte_patch_ids: torch.Tensor, num_patches: int, k: int) -> torch.Tensor:
    """[B, 1, T, P*k]: each byte sees the k keys of one patch (the patch given by `byte_patch_ids`)."""
    patches = torch.arange(num_patches, device=byte_patch_ids.device)
    mask = byte_patch_ids[:, :, None] == patches[None, None, :]  # [B, T, P]
    return mask.repeat_interleave(k, dim=2).unsqueeze(1)


@dataclass
class LocalMask:
    """Causal self-attention over a whole sequence, within `window` positions (None: unbounded) and
    within documents (`docs` [B, T], or None when nothing splits them).

    Attention builds what it needs from this: nothing at all for plain causal attention, a dense
    [B, 1, T, T] mask for short sequences, or banded blocks for sequences longer than two windows.
    """

    length: int
    window: int | None
    docs: torch.Tensor | None = None
    _built: dict = field(default_factory=dict, repr=False, compare=False)  # every layer shares one mask

    @property
    def banded(self) -> bool:
        return self.window is not None and self.length > 2 * self.window

    @property
    def plain_causal(self) -> bool:
        return self.docs is None and (self.window is None or self.length <= self.window)

    def dense(self, device) -> torch.Tensor:
        return self_attention_mask(torch.arange(self.length, device=device), window=self.window, q_doc=self.docs)

    @property
    def block_size(self) -> int:
        """Queries per block: half a window (a window of W keys spans at most 3 half-window blocks)."""
        return max(1, (self.window + 1) // 2)

    @property
    def blocks_back(self) -> int:
        return -(-self.window // self.block_size)

    def blocks(self, device) -> torch.Tensor:
        """[B or 1, n_blocks, 1, S, (R+1)*S]: the queries of block i (S = `block_size` positions)
        against the keys of blocks i-R .. i (R = `blocks_back`); a key before position 0 or past the
        end is never visible."""
        size, reach = self.block_size, self.blocks_back
        n_blocks = -(-self.length // size)
        q_pos = torch.arange(n_blocks * size, device=device).view(n_blocks, size)
        k_pos = torch.cat([q_pos - (reach - j) * size for j in range(reach + 1)], dim=1)  # [nb, (R+1)*S]
        mask = causal(q_pos, k_pos) & sliding_window(q_pos, k_pos, self.window) & (k_pos >= 0).unsqueeze(1)
        mask = mask.unsqueeze(0)
        if self.docs is not None:
            pad = n_blocks * size - self.length
            docs = torch.nn.functional.pad(self.docs, (0, pad), value=-1).view(-1, n_blocks, size)
            earlier = torch.nn.functional.pad(docs, (0, 0, reach, 0), value=-2)
            k_docs = torch.cat([earlier[:, j : j + n_blocks] for j in range(reach + 1)], dim=2)
            mask = mask & same_document(docs, k_docs)
        return mask.unsqueeze(2)

    def additive_blocks(self, device, dtype) -> torch.Tensor:
        """`blocks` as 0 / -inf, built once and shared by every layer (SDPA would otherwise convert
        a boolean mask on every call)."""
        key = ("blocks", device, dtype)
        if key not in self._built:
            allowed = self.blocks(device)
            self._built[key] = torch.zeros(allowed.shape, device=device, dtype=dtype).masked_fill_(
                ~allowed, float("-inf")
            )
        return self._built[key]


def sequence_self_mask(
    ids: torch.Tensor, window: int | None, document_mask: bool, eos_id: int = EOS_ID
) -> LocalMask | None:
    """The self-attention mask of a whole byte sequence [B, T], or None when plain causal attention
    is exactly right (no window cut and no document boundary), so attention can take the fast path."""
    docs = None
    # an EOS in the last position ends a document but separates nothing
    if document_mask and bool((ids[:, :-1] == eos_id).any()):
        docs = document_ids(ids, eos_id)
    mask = LocalMask(ids.shape[1], window, docs)
    return None if mask.plain_causal else mask
