"""The one transformer block (and the one attention) behind all four stacks: entropy model, local
encoder, global transformer and local decoder.

Pre-norm Llama-style block: RMSNorm, attention with rotary position embeddings (RoPE, adjacent pairs
rotated, as in the release), optional grouped-query attention, SwiGLU feed-forward. The patch
cross-attention of the local models reuses the same `Attention`, without RoPE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def ffn_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """The release's SwiGLU width: 2/3 of 4*dim, scaled, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for arbitrary positions, computed in float32."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq  # [..., T, hd/2]
        return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of `x` [B, T, H, hd]; cos/sin are [T, hd/2] or [B, T, hd/2]."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    """Multi-head attention through `scaled_dot_product_attention`.

    Self-attention when `kv` is None (RoPE applied to q and k), cross-attention otherwise (no RoPE).
    `cache`, when given, is an object whose `update(k, v)` returns the keys/values to attend to.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        if n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        self.head_dim = head_dim or dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def project_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `kv` [B, S, D] -> two [B, S, Hkv, hd] (cacheable for cross-attention)."""
        k = self.wk(kv).unflatten(-1, (self.n_kv_heads, self.head_dim))
        v = self.wv(kv).unflatten(-1, (self.n_kv_heads, self.head_dim))
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        kv: torch.Tensor | None = None,
        kv_projected: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache=None,
    ) -> torch.Tensor:
        q = self.wq(x).unflatten(-1, (self.n_heads, self.head_dim))  # [B, T, H, hd]
        if kv_projected is not None:
            k, v = kv_projected
        else:
            k, v = self.project_kv(x if kv is None else kv)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, hd]
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
        return self.wo(out.transpose(1, 2).flatten(-2))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None, ffn_dim: int, norm_eps: float = 1e-5):
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, n_heads, n_kv_heads)
        self.ffn_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.ffn = FeedForward(dim, ffn_dim)

    def forward(self, x, rope, mask=None, is_causal=False, cache=None) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x), rope, mask=mask, is_causal=is_causal, cache=cache)
        return h + self.ffn(self.ffn_norm(h))


class CrossAttention(nn.Module):
    """Patch cross-attention of the local models: RMSNorm on queries and on keys/values, no RoPE.

    Returns `x + attention`, as the release does (its callers add the residual once more).
    """

    def __init__(self, dim: int, n_heads: int, norm_eps: float = 1e-5):
        super().__init__()
        self.q_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.kv_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, n_heads)

    def project_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attn.project_kv(self.kv_norm(kv))

    def forward(self, x, kv=None, mask=None, kv_projected=None) -> torch.Tensor:
        if kv_projected is None:
            kv_projected = self.project_kv(kv)
        return x + self.attn(self.q_norm(x), mask=mask, kv_projected=kv_projected)
