"""The global (latent) transformer (paper §3.1): the large model, run once per patch.

Its input is each patch's k pooled vectors concatenated (k * d_encoder wide), projected to the global
width when the two differ (the 7B shape: k=4, d_encoder=1024, d_global=4096 needs no projection, but
k=4 with d_global != 4096 does).
"""

from __future__ import annotations

import torch
from torch import nn

from blt.config import BLTConfig
from blt.model.transformer import RotaryEmbedding, TransformerBlock, run_layers


class GlobalTransformer(nn.Module):
    def __init__(self, config: BLTConfig):
        super().__init__()
        c = config
        self.in_proj = (
            nn.Linear(c.global_input_dim, c.dim_global, bias=False) if c.global_input_dim != c.dim_global else None
        )
        self.rope = RotaryEmbedding(c.dim_global // c.n_heads_global, c.rope_theta)
        self.layers = nn.ModuleList(
            TransformerBlock(c.dim_global, c.n_heads_global, c.n_kv_heads_global, c.ffn_dims[1], c.norm_eps)
            for _ in range(c.n_layers_global)
        )

    def forward(self, patches: torch.Tensor, mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """patches [B, P, k*D_enc] -> [B, P, D_global]; causal over patches (`mask` adds document blocks)."""
        h = patches if self.in_proj is None else self.in_proj(patches)
        rope = self.rope(torch.arange(h.shape[1], device=h.device))
        return run_layers(self.layers, h, rope, mask, cache)[0]
