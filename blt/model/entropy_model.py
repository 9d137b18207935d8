"""The entropy model (paper §2.3): a small byte-level transformer LM with sliding-window attention.
Its next-byte entropy H(x_i) = -sum_v p(v | x_<i) log p(v | x_<i), in nats, places patch boundaries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blt.config import EntropyModelConfig
from blt.model.masks import sequence_self_mask
from blt.model.transformer import RMSNorm, RotaryEmbedding, TransformerBlock, run_layers


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the softmax of `logits` [..., V] -> [...], computed in float32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class EntropyModel(nn.Module):
    def __init__(self, config: EntropyModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.rope = RotaryEmbedding(c.dim // c.n_heads, c.rope_theta)
        self.layers = nn.ModuleList(
            TransformerBlock(c.dim, c.n_heads, c.n_kv_heads, c.hidden_dim, c.norm_eps) for _ in range(c.n_layers)
        )
        self.norm = RMSNorm(c.dim, eps=c.norm_eps)
        self.output = nn.Linear(c.dim, c.vocab_size, bias=False)

    def forward(self, ids: torch.Tensor, cache=None) -> torch.Tensor:
        """Next-byte logits [B, T, V] for ids [B, T]; every row is independent of the others.
        With a `cache` prepared by `cache.prefill(lengths)`, the rows' keys/values are kept for decoding."""
        h = self.tok_embeddings(ids)
        mask = sequence_self_mask(ids, self.config.sliding_window, self.config.document_mask)
        rope = self.rope(torch.arange(ids.shape[1], device=ids.device))
        h, _ = run_layers(self.layers, h, rope, mask, cache)
        return self.output(self.norm(h))

    @torch.no_grad()
    def entropies(self, ids: torch.Tensor) -> torch.Tensor:
        """H at every position [B, T]: the entropy of the prediction made there (for the next byte)."""
        return entropy(self(ids))
