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

from blt.model.masks import LocalMask


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` that takes its input in its weight's dtype: under autocast a bfloat16 input with float32 weights
    would take torch's unfused path (a warning and a slower step); elsewhere the cast does nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype))


class RotaryEmbedding(nn.Module):
    """Rotations e^{i·pos·θ_j} for arbitrary positions, as complex64 [..., T, hd/2]."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.register_buffer(
            "inv_freq", 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim), persistent=False
        )

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        angles = positions.float().unsqueeze(-1) * self.inv_freq
        return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate the adjacent pairs (x[2i], x[2i+1]) of `x` [B, T, H, hd], as complex numbers, by
    `rotation` [T, hd/2] or [B, T, hd/2] (the release's pairing; a complex multiply is one kernel)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation.unsqueeze(-2)).flatten(-2).type_as(x)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
    """`scaled_dot_product_attention`, in float32 under a CPU autocast: there, bfloat16 attention's backward
    takes about twice as long as float32's (torch 2.13, 2 cores), while the matrix products around it gain."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.float()
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask, is_causal=is_causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=is_causal)


def windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: LocalMask) -> torch.Tensor:
    """Sliding-window attention in blocks: q, k, v [B, H, T, hd]; each block of queries attends to its
    own keys and those of the blocks that the window reaches back into.

    Equal to a dense T x T masked attention, at about 1.5 W instead of T keys per query."""
    b, h, length, hd = q.shape
    size, reach = mask.block_size, mask.blocks_back
    n_blocks = -(-length // size)
    pad = n_blocks * size - length

    def blocked(x):  # [B, H, T, hd] -> [B, nb, H, size, hd]
        return F.pad(x, (0, 0, 0, pad)).view(b, h, n_blocks, size, hd).transpose(1, 2)

    def with_context(x):  # [B, nb, H, size, hd] -> [B, nb, H, (reach + 1) * size, hd]: earlier blocks first
        padded = F.pad(x, (0, 0, 0, 0, 0, 0, reach, 0))
        return torch.cat([padded[:, j : j + n_blocks] for j in range(reach + 1)], dim=3)

    qb, kk, vv = blocked(q), with_context(blocked(k)), with_context(blocked(v))
    masks = mask.additive_blocks(q.device, q.dtype).expand(b, -1, -1, -1, -1)
    out = sdpa(qb.flatten(0, 1), kk.flatten(0, 1), vv.flatten(0, 1), attn_mask=masks.flatten(0, 1))
    return out.view(b, n_blocks, h, size, hd).transpose(1, 2).reshape(b, h, n_blocks * size, hd)[:, :, :length]


def gather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Query t attends to exactly the keys of group index[t]: q [B, T, H, hd], k/v [B, G, n, H, hd],
    index [B, T] -> [B, T, H, hd]. (The decoder: a byte reads the k keys of one patch.)"""
    b, length, h, hd = q.shape
    n = k.shape[2]
    rows = index[:, :, None].expand(-1, -1, n * h * hd)
    kg = k.flatten(2).gather(1, rows).view(b * length, n, h, hd)  # [B*T, n, H, hd]
    vg = v.flatten(2).gather(1, rows).view(b * length, n, h, hd)
    out = sdpa(q.reshape(b * length, 1, h, hd).transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2))
    return out.transpose(1, 2).reshape(b, length, h, hd)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The queries of group g attend to the keys t with index[t] == g: q [B, G, n, H, hd], k/v
    [B, T, H, hd] -> [B, G, n, H, hd]; a group without keys gets zeros. (The encoder: a patch's k
    queries read the bytes of that patch.) A softmax within each segment, so the cost is the T keys
    times n, not G*n*T as a dense masked attention would be."""
    b, groups, n, h, hd = q.shape
    rows = torch.arange(b, device=q.device).unsqueeze(1)
    scores = torch.einsum("btnhd,bthd->btnh", q[rows, index].float(), k.float()).float() * hd**-0.5  # [B, T, n, H]
    seg = index[:, :, None, None].expand_as(scores)
    top = torch.full((b, groups, n, h), float("-inf"), device=q.device).scatter_reduce(1, seg, scores.detach(), "amax")
    weights = (scores - top.gather(1, seg)).exp()
    total = torch.zeros(b, groups, n, h, device=q.device).scatter_add(1, seg, weights)
    weights = weights / total.gather(1, seg)
    out = torch.zeros(b, groups, n, h, hd, device=q.device).scatter_add(
        1, index[:, :, None, None, None].expand(b, -1, n, h, hd), weights.unsqueeze(-1) * v.float().unsqueeze(2)
    )
    return out.type_as(q)


class Attention(nn.Module):
    """Multi-head self-attention through `scaled_dot_product_attention`, with RoPE on q and k.

    `mask`: None with `is_causal` (plain causal), a boolean tensor [B|1, 1, Tq, Tk], or a `LocalMask`
    (sliding window / documents over a whole sequence). `cache`, when given, is an object whose
    `update(k, v)` returns the keys/values to attend to (incremental decoding).
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

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        return self.wq(x).unflatten(-1, (self.n_heads, self.head_dim))

    def project_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `kv` [B, S, D] -> two [B, S, Hkv, hd] (cacheable)."""
        k = self.wk(kv).unflatten(-1, (self.n_kv_heads, self.head_dim))
        v = self.wv(kv).unflatten(-1, (self.n_kv_heads, self.head_dim))
        return k, v

    def repeat_kv(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        rep = self.n_heads // self.n_kv_heads
        return x if rep == 1 else x.repeat_interleave(rep, dim=dim)

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor | None = None, mask=None, is_causal: bool = False, cache=None
    ) -> torch.Tensor:
        q = self.project_q(x)  # [B, T, H, hd]
        k, v = self.project_kv(x)
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if cache is not None:
            k, v = cache.update(k, v)
        q, k, v = (
            q.transpose(1, 2),
            self.repeat_kv(k.transpose(1, 2), 1),
            self.repeat_kv(v.transpose(1, 2), 1),
        )  # [B, H, T, hd]
        if isinstance(mask, LocalMask):
            if mask.banded:
                out = windowed_attention(q, k, v, mask)
                return self.wo(out.transpose(1, 2).flatten(-2))
            mask = None if mask.plain_causal else mask.dense(x.device)
            is_causal = mask is None
        out = sdpa(q, k, v, mask, is_causal=is_causal and mask is None)
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
        self.attn_norm = RMSNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, n_heads, n_kv_heads)
        self.ffn_norm = RMSNorm(dim, eps=norm_eps)
        self.ffn = FeedForward(dim, ffn_dim)

    def forward(self, x, rope, mask=None, is_causal=False, cache=None) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x), rope, mask=mask, is_causal=is_causal, cache=cache)
        return h + self.ffn(self.ffn_norm(h))


def run_layers(layers: nn.ModuleList, h: torch.Tensor, rope: torch.Tensor, mask=None, cache=None, keep=None):
    """The one loop of a self-attention stack, behind its forward pass with or without a cache (prefill); decoding
    steps run fused inference copies of the same blocks (`block_step`, below).

    `mask` None means plain causal attention; a KV `cache` gives layer i its `cache.layer(i)`. Returns the output
    and the states after each layer i for which `keep(i)` holds (the local encoder pools those)."""
    kept = []
    for i, layer in enumerate(layers):
        h = layer(h, rope, mask=mask, is_causal=mask is None, cache=cache.layer(i) if cache is not None else None)
        if keep is not None and keep(i):
            kept.append(h)
    return h, kept


class CrossAttention(nn.Module):
    """Patch cross-attention of the local models: RMSNorm on queries and on keys/values, no RoPE.

    `pool` (encoder): each patch's k queries read the bytes of that patch.
    `read` (decoder): each byte reads the k keys of one patch.
    Both return `x + attention`, as the release does (its callers add the residual once more).
    """

    def __init__(self, dim: int, n_heads: int, norm_eps: float = 1e-5):
        super().__init__()
        self.q_norm = RMSNorm(dim, eps=norm_eps)
        self.kv_norm = RMSNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, n_heads)

    def project_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attn.project_kv(self.kv_norm(kv))

    def pool(self, queries: torch.Tensor, h: torch.Tensor, byte_patch: torch.Tensor, k: int) -> torch.Tensor:
        """queries [B, P*k, D], byte states h [B, T, D], byte_patch [B, T] -> [B, P*k, D]."""
        q = self.attn.project_q(self.q_norm(queries)).unflatten(1, (-1, k))  # [B, P, k, H, hd]
        keys, values = self.project_kv(h)
        out = segment_attention(q, keys, values, byte_patch)
        return queries + self.attn.wo(out.flatten(1, 2).flatten(-2))

    def read(
        self, h: torch.Tensor, patch_kv: tuple[torch.Tensor, torch.Tensor], patch_index: torch.Tensor
    ) -> torch.Tensor:
        """h [B, T, D]; patch_kv: keys/values [B, P, k, H, hd] (from `patch_kv`); patch_index [B, T]."""
        out = gather_attention(self.attn.project_q(self.q_norm(h)), *patch_kv, patch_index)
        return h + self.attn.wo(out.flatten(-2))

    def patch_kv(self, slots: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of patch slots [B, P*k, D] grouped per patch: two [B, P, k, H, hd]."""
        keys, values = self.project_kv(slots)
        return keys.unflatten(1, (-1, k)), values.unflatten(1, (-1, k))


# ---- decoding-step helpers (inference only: the forward paths above stay as they are) ------------------
class FusedBlock:
    """An inference copy of a `TransformerBlock` for one-position steps: q/k/v in one matrix, w1/w3 in one,
    all stored transposed ([in, out]) so that a step's projections are single `mm` calls on [B, D] states.

    The parameters of the block are untouched; the fused matrices are copies made when decoding starts."""

    def __init__(self, block: TransformerBlock):
        a, f = block.attn, block.ffn
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.attn_norm, self.ffn_norm = block.attn_norm, block.ffn_norm
        self.wqkv = torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]).detach().t()  # [D, (H + 2 Hkv) hd]
        self.wo = a.wo.weight.detach().t()
        self.w13 = torch.cat([f.w1.weight, f.w3.weight]).detach().t()  # [D, 2 F]
        self.w2 = f.w2.weight.detach().t()
        self.hidden = f.w1.weight.shape[0]
        self.rep = a.n_heads // a.n_kv_heads


def rms(norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` in the few kernels of its own arithmetic (float32; else the library call)."""
    if x.dtype != torch.float32 or norm.eps is None:
        return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def additive_mask(mask: torch.Tensor, dtype) -> torch.Tensor:
    """A boolean attention mask as the additive one sdpa would make of it (made once per stack per step)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def step_rotation(rope: RotaryEmbedding, positions: torch.Tensor) -> torch.Tensor:
    """The rotations of one position per row, [B, 1, hd/2]: complex, or compiled, its (cos, sin) [B, 1, hd/2, 2]
    (inductor generates no code for complex numbers)."""
    if torch.compiler.is_compiling():
        angles = positions.float()[:, None, None] * rope.inv_freq
        return torch.stack([angles.cos(), angles.sin()], dim=-1)
    return rope(positions)[:, None]


def rotate_step(qk: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """RoPE for one position per row: qk [B, H, hd] (queries and keys together), rotation from `step_rotation`."""
    if torch.compiler.is_compiling():  # real arithmetic
        x = qk.float().unflatten(-1, (-1, 2))
        c, s = rotation[..., 0], rotation[..., 1]
        x0, x1 = x[..., 0], x[..., 1]
        return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).type_as(qk)
    if qk.dtype == torch.float32:  # as complex pairs, one kernel
        pairs = torch.view_as_complex(qk.unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * rotation).flatten(-2)
    return apply_rotary(qk[:, None], rotation)[:, 0]


def attend_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query per row and head: q [B, H, hd], k/v [B, H, S, hd], additive mask [B, 1, 1, S]
    -> [B, H * hd]. Compiled, it is spelled out so that inductor fuses it (the library kernel is slow at
    this size on a CPU)."""
    if not torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask).flatten(1)
    scores = torch.einsum("bhd,bhsd->bhs", q.float(), k.float()) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask[:, 0]
    return torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), v.float()).flatten(1).type_as(q)


def block_step(b: FusedBlock, x: torch.Tensor, rotation: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
    """`TransformerBlock.forward` for one position per row: x [B, D], rotation [B, 1, hd/2], mask [B, 1, 1, S]
    (additive) over the slots `cache.update` returns -> [B, D]. The same arithmetic in fewer kernels."""
    h_q, h_kv, hd = b.n_heads, b.n_kv_heads, b.head_dim
    qkv = torch.mm(rms(b.attn_norm, x), b.wqkv)  # [B, (H + 2 Hkv) hd]
    qk, v = qkv[:, : (h_q + h_kv) * hd], qkv[:, (h_q + h_kv) * hd :]
    qk = rotate_step(qk.unflatten(-1, (h_q + h_kv, hd)), rotation)  # [B, H + Hkv, hd]
    q, k = qk[:, :h_q], qk[:, h_q:]
    k, v = cache.update(k[:, None], v.unflatten(-1, (h_kv, hd))[:, None])  # [B, Hkv, S, hd]
    if b.rep > 1:
        k, v = k.repeat_interleave(b.rep, dim=1), v.repeat_interleave(b.rep, dim=1)
    h = x + torch.mm(attend_step(q, k, v, mask), b.wo)
    gate, up = torch.mm(rms(b.ffn_norm, h), b.w13).split(b.hidden, dim=-1)
    return h + torch.mm(F.silu(gate) * up, b.w2)


def block_chunk(
    b: FusedBlock,
    x: torch.Tensor,
    rotation: torch.Tensor,
    mask: torch.Tensor,
    context: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """`block_step` for n new positions per row at once (speculative verification): x [B, n, D], rotation
    [B, n, hd/2], `context` the keys/values before them [B, S, Hkv, hd], mask [B, 1, n, S + n] (additive) over the
    context and the n positions themselves -> [B, n, D], and the n positions' own keys/values [B, n, Hkv, hd]."""
    h_q, h_kv, hd = b.n_heads, b.n_kv_heads, b.head_dim
    qkv = torch.matmul(rms(b.attn_norm, x), b.wqkv)  # [B, n, (H + 2 Hkv) hd]
    qk = apply_rotary(qkv[..., : (h_q + h_kv) * hd].unflatten(-1, (h_q + h_kv, hd)), rotation)  # [B, n, H + Hkv, hd]
    q, k = qk[:, :, :h_q], qk[:, :, h_q:]
    v = qkv[..., (h_q + h_kv) * hd :].unflatten(-1, (h_kv, hd))
    keys = torch.cat([context[0], k.to(context[0].dtype)], 1).transpose(1, 2)  # [B, Hkv, S + n, hd]
    values = torch.cat([context[1], v.to(context[1].dtype)], 1).transpose(1, 2)
    if b.rep > 1:
        keys, values = keys.repeat_interleave(b.rep, dim=1), values.repeat_interleave(b.rep, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask)  # [B, H, n, hd]
    h = x + torch.matmul(out.transpose(1, 2).flatten(2), b.wo)
    gate, up = torch.matmul(rms(b.ffn_norm, h), b.w13).split(b.hidden, dim=-1)
    return h + torch.matmul(F.silu(gate) * up, b.w2), (k, v)
