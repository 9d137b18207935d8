"""The Byte Latent Transformer: bytes -> patches -> local encoder -> global transformer -> local decoder.

ids [B, T] --patcher--> starts [B, T+1]
local encoder:  byte states h [B, T, D_enc], patch vectors [B, P, k*D_enc]
global:         patch outputs [B, P, D_global]          (once per patch: where the FLOPs are saved)
local decoder:  byte t reads the outputs of the patch before the one byte t+1 belongs to
                -> next-byte logits [B, T, 260]
"""

from __future__ import annotations

import torch
from torch import nn

from blt.config import BLTConfig
from blt.errors import BltError
from blt.model.global_transformer import GlobalTransformer
from blt.model.local_decoder import LocalDecoder
from blt.model.local_encoder import LocalEncoder
from blt.model.masks import document_ids, self_attention_mask, sequence_self_mask
from blt.model.patching import Patcher, build_patcher, lengths_to_starts
from blt.tokenizer import EOS_ID, encode


def check_ids(ids, vocab_size: int) -> torch.Tensor:
    """Validate a batch of byte ids [B, T]; errors name the problem."""
    if not isinstance(ids, torch.Tensor):
        raise BltError(f"ids must be a torch.Tensor of shape [B, T], got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise BltError(f"ids must be an integer tensor, got {ids.dtype}")
    if ids.dim() != 2:
        hint = " (add a batch dimension: ids[None])" if ids.dim() == 1 else ""
        raise BltError(f"ids must have shape [B, T], got {list(ids.shape)}{hint}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise BltError(f"empty sequence: ids has shape {list(ids.shape)}")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        b, t = (int(x) for x in bad.nonzero()[0])
        raise BltError(f"ids must lie in 0..{vocab_size - 1}; found {int(ids[b, t])} at row {b}, position {t}")
    return ids.long()


def init_weights(module: nn.Module) -> None:
    """The release's initialisation: truncated normals (±3σ) with σ = fan_in^-0.5, norms at one."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            std = m.in_features**-0.5
            nn.init.trunc_normal_(m.weight, std=std, a=-3 * std, b=3 * std)
        elif isinstance(m, nn.Embedding):
            std = m.embedding_dim**-0.5
            nn.init.trunc_normal_(m.weight, std=std, a=-3 * std, b=3 * std)
        elif isinstance(m, nn.RMSNorm):
            nn.init.ones_(m.weight)


class BLT(nn.Module):
    """The network. Its patcher (with the frozen entropy model it may hold) is not one of its submodules: the
    patcher's weights are not in `state_dict()` or `parameters()` (they are saved, trained and sharded on their
    own), yet `.to()`, `.float()`, `.cuda()` move them along with the model (`_apply`)."""

    def __init__(self, config: BLTConfig, patcher: Patcher | None = None):
        super().__init__()
        self.config = config
        self.local_encoder = LocalEncoder(config)
        self.global_transformer = GlobalTransformer(config)
        self.local_decoder = LocalDecoder(config)
        init_weights(self)
        self.patcher = patcher if patcher is not None else build_patcher(config.patching)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.patcher is not None:
            for module in self.patcher.modules():
                module._apply(fn, *args, **kwargs)
        return self

    # ---- patches ---------------------------------------------------------------------------
    def patch_starts(self, ids: torch.Tensor, patch_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T+1] "a patch starts here" over the bytes and the byte after them."""
        if patch_lengths is not None:
            return lengths_to_starts(patch_lengths.to(ids.device), ids.shape[1])
        if self.patcher is None:
            raise BltError(
                f"this model patches with {self.config.patching.mode!r} but has no entropy model attached: "
                "load it with its entropy model or pass patch_lengths"
            )
        return self.patcher(ids)

    def encode(self, text: str | bytes, bos: bool = True) -> torch.Tensor:
        """The ids of `text` as this model reads them ([T], BOS first)."""
        return self.patcher.encode(text, bos) if self.patcher is not None else encode(text, bos)

    # ---- forward ---------------------------------------------------------------------------
    def forward(
        self, ids: torch.Tensor, patch_lengths: torch.Tensor | None = None, patch_starts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-byte logits [B, T, 260] for ids [B, T].

        Patches come from `patch_lengths` [B, P], from a precomputed `patch_starts` [B, T+1] mask, or
        from the attached patcher.
        """
        c = self.config
        ids = check_ids(ids, c.vocab_size)
        starts = patch_starts if patch_starts is not None else self.patch_starts(ids, patch_lengths)
        length = ids.shape[1]
        if starts.shape != (ids.shape[0], length + 1):
            raise BltError(f"patch_starts must have shape {[ids.shape[0], length + 1]}, got {list(starts.shape)}")
        patch_of = starts.long().cumsum(1) - 1  # patch index of positions 0..T
        num_patches = int(patch_of[:, -1].max()) + 1
        byte_patch = patch_of[:, :length]
        dec_patch = patch_of[:, 1:] - 1  # byte t reads the patch before the one byte t+1 is in

        self_mask = sequence_self_mask(ids, c.local_attention_window_len, c.local_document_mask)
        h, patches, _ = self.local_encoder(ids, byte_patch, num_patches, self_mask)
        global_out = self.global_transformer(patches, self.global_mask(ids, byte_patch, num_patches))
        return self.local_decoder(h, global_out, dec_patch, self_mask)

    def global_mask(self, ids: torch.Tensor, byte_patch: torch.Tensor, num_patches: int) -> torch.Tensor | None:
        """Block-causal mask over patches when documents are packed (a patch holding EOS ends one)."""
        if not self.config.global_document_mask or not bool((ids == EOS_ID).any()):
            return None
        has_eos = torch.zeros(ids.shape[0], num_patches, dtype=torch.long, device=ids.device)
        has_eos.scatter_add_(1, byte_patch, (ids == EOS_ID).long())
        patch_ids = torch.where(has_eos > 0, EOS_ID, EOS_ID + 1)
        pos = torch.arange(num_patches, device=ids.device)
        return self_attention_mask(pos, q_doc=document_ids(patch_ids, EOS_ID))

    @property
    def entropy_model(self):
        return getattr(self.patcher, "entropy_model", None)

    def num_params(self, embeddings: bool = True) -> int:
        params = {id(p): p for p in self.parameters()}
        if not embeddings:
            for m in (self.local_encoder.tok_embeddings, self.local_encoder.hash_embeddings):
                for p in m.parameters() if m is not None else ():
                    params.pop(id(p), None)
        return sum(p.numel() for p in params.values())
