"""Local encoder (paper §3.2): a light byte transformer whose patch cross-attention pools the bytes
of each patch into that patch's representation.

Bytes are embedded (byte embedding + hash n-gram embeddings), run through sliding-window
self-attention layers, and after the last layer (or after every layer) `k` queries per patch attend
to the bytes of that patch only. The queries start as the max-pool of the patch's byte states,
projected to k * d and split into k vectors (`cross_attn_init_by_pooling` in the release); pooling
happens once, later cross-attention layers refine the same queries.
"""

from __future__ import annotations

import torch
from torch import nn

from blt.config import BLTConfig
from blt.model.hash_embeddings import HashNgramEmbedding
from blt.model.transformer import CrossAttention, RotaryEmbedding, TransformerBlock, run_layers


def max_pool_patches(h: torch.Tensor, byte_patch_ids: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Max over the bytes of each patch: h [B, T, D] -> [B, P, D]; a patch with no byte gets zeros."""
    index = byte_patch_ids.unsqueeze(-1).expand_as(h)
    out = h.new_zeros(h.shape[0], num_patches, h.shape[-1])
    return out.scatter_reduce(1, index, h, reduce="amax", include_self=False)


class LocalEncoder(nn.Module):
    def __init__(self, config: BLTConfig):
        super().__init__()
        c = config
        dim, self.k = c.dim_local_encoder, c.cross_attn_k
        self.cross_all_layers = c.cross_attn_all_layers_encoder
        self.tok_embeddings = nn.Embedding(c.vocab_size, dim)
        self.hash_embeddings = (
            HashNgramEmbedding(
                dim,
                tuple(c.encoder_hash_byte_group_size),
                c.encoder_hash_byte_group_vocab,
                c.encoder_hash_byte_group_nb_functions,
            )
            if c.encoder_hash_byte_group_size and c.encoder_hash_byte_group_nb_functions > 0
            else None
        )
        self.rope = RotaryEmbedding(dim // c.n_heads_local_encoder, c.rope_theta)
        self.layers = nn.ModuleList(
            TransformerBlock(dim, c.n_heads_local_encoder, c.n_kv_heads, c.ffn_dims[0], c.norm_eps)
            for _ in range(c.n_layers_local_encoder)
        )
        self.patch_projection = nn.Linear(dim, self.k * dim, bias=False)
        n_cross = c.n_layers_local_encoder if self.cross_all_layers else 1
        self.cross_attn = nn.ModuleList(CrossAttention(dim, c.cross_heads_encoder, c.norm_eps) for _ in range(n_cross))

    def embed(self, ids: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Byte embedding plus hash n-gram embeddings [B, T, D]; `prefix` holds preceding ids."""
        h = self.tok_embeddings(ids)
        if self.hash_embeddings is not None:
            h = h + self.hash_embeddings(ids, prefix)
        return h

    def has_cross_attn(self, layer: int) -> bool:
        return self.cross_all_layers or layer == len(self.layers) - 1

    def pool_patches(self, states: list[torch.Tensor], byte_patch_ids: torch.Tensor, num_patches: int) -> torch.Tensor:
        """Patch representations [B, P, k*D] from the byte states after each cross-attention layer."""
        pooled = self.patch_projection(max_pool_patches(states[0], byte_patch_ids, num_patches))
        queries = pooled.unflatten(-1, (self.k, -1)).flatten(1, 2)  # [B, P*k, D]
        for cross, h in zip(self.cross_attn, states):
            queries = queries + cross.pool(queries, h, byte_patch_ids, self.k)
        return queries.unflatten(1, (num_patches, self.k)).flatten(2)

    def forward(self, ids: torch.Tensor, byte_patch_ids: torch.Tensor, num_patches: int, self_mask, cache=None):
        """-> byte states [B, T, D] and patch representations [B, P, k*D]. (The cross-attention reads
        the byte states but never writes to them, so it runs after the layers.)"""
        h = self.embed(ids)
        rope = self.rope(torch.arange(ids.shape[1], device=ids.device))
        h, states = run_layers(self.layers, h, rope, self_mask, cache, keep=self.has_cross_attn)
        return h, self.pool_patches(states, byte_patch_ids, num_patches), states
