"""Attention masks, each built by one small function. True means "may attend".

Self-attention masks are [B, 1, Tq, Tk] booleans built from absolute positions, so the same functions
serve a full forward pass and a decoding step against a cache. Patch cross-attention masks say which
bytes belong to which patch.
"""

from __future__ import annotations

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


def patch_ids_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """Patch index of every position, from a [B, L] boolean "a patch starts here" mask."""
    return starts.long().cumsum(-1) - 1


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


def sequence_self_mask(ids: torch.Tensor, window: int | None, document_mask: bool, eos_id: int = EOS_ID) -> torch.Tensor | None:
    """Self-attention mask of a whole byte sequence [B, T], or None when plain causal attention is
    exactly right (no window cut and no document boundary), so the caller can take the fast path."""
    length = ids.shape[1]
    docs = None
    # an EOS in the last position ends a document but separates nothing
    if document_mask and bool((ids[:, :-1] == eos_id).any()):
        docs = document_ids(ids, eos_id)
    if docs is None and (window is None or length <= window):
        return None
    return self_attention_mask(torch.arange(length, device=ids.device), window=window, q_doc=docs)
