"""Local decoder (paper §3.3): a light byte transformer that cross-attends to the global outputs and
predicts the next byte.

Each global output is projected to k keys/values of the decoder width. Byte t, which predicts byte
t+1, attends to the k keys of the last patch that ends at or before t: the patch before the one that
byte t+1 belongs to (the release's one-patch shift), so no byte sees its own future. Cross-attention
comes before the self-attention block, on the first layer or on all layers.
"""

from __future__ import annotations

import torch
from torch import nn

from blt.config import BLTConfig
from blt.model.transformer import CrossAttention, RMSNorm, RotaryEmbedding, TransformerBlock


class LocalDecoder(nn.Module):
    def __init__(self, config: BLTConfig):
        super().__init__()
        c = config
        dim, self.k = c.dim_local_decoder, c.cross_attn_k
        self.cross_all_layers = c.cross_attn_all_layers_decoder
        self.patch_projection = nn.Linear(c.dim_global, self.k * dim, bias=False)
        self.rope = RotaryEmbedding(dim // c.n_heads_local_decoder, c.rope_theta)
        self.layers = nn.ModuleList(
            TransformerBlock(dim, c.n_heads_local_decoder, c.n_kv_heads, c.ffn_dims[2], c.norm_eps)
            for _ in range(c.n_layers_local_decoder)
        )
        n_cross = c.n_layers_local_decoder if self.cross_all_layers else 1
        self.cross_attn = nn.ModuleList(CrossAttention(dim, c.cross_heads_decoder, c.norm_eps) for _ in range(n_cross))
        self.norm = RMSNorm(dim, eps=c.norm_eps)
        self.output = nn.Linear(dim, c.vocab_size, bias=False)

    def has_cross_attn(self, layer: int) -> bool:
        return self.cross_all_layers or layer == 0

    def patch_keys(self, global_out: torch.Tensor) -> torch.Tensor:
        """Global outputs [B, P, D_global] -> k key/value vectors per patch [B, P*k, D]."""
        return self.patch_projection(global_out).unflatten(-1, (self.k, -1)).flatten(1, 2)

    def patch_kv(self, global_out: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys/values [B, P, k, H, hd] of every cross-attention layer for global outputs [B, P, D_global]."""
        slots = self.patch_keys(global_out)
        return [cross.patch_kv(slots, self.k) for cross in self.cross_attn]

    def forward(
        self, h: torch.Tensor, global_out: torch.Tensor, dec_patch_ids: torch.Tensor, self_mask, cache=None
    ) -> torch.Tensor:
        """h: encoder byte states [B, T, D]; dec_patch_ids [B, T]: the patch byte t reads -> logits [B, T, V]."""
        return self._run(
            h,
            self.patch_kv(global_out),
            dec_patch_ids,
            self.rope(torch.arange(h.shape[1], device=h.device)),
            self_mask,
            cache,
        )

    def _run(self, h, patch_kv, read, rope, mask, cache):
        for i, layer in enumerate(self.layers):
            if self.has_cross_attn(i):
                j = i if self.cross_all_layers else 0
                h = h + self.cross_attn[j].read(h, patch_kv[j], read)
            h = layer(h, rope, mask=mask, is_causal=mask is None, cache=cache.layer(i) if cache is not None else None)
        return self.output(self.norm(h))
