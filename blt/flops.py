"""FLOPs per byte of a BLT, counted the paper's way, and of what this implementation executes.

The paper's accounting:
- only matrix multiplies count; [m, k] @ [k, n] costs 2*m*k*n (one multiply and one add per term);
- embedding lookups (bytes, hash n-grams) are free; norms, activations, softmax and RoPE are not counted;
- backward costs twice the forward, so a trained component costs 3x its forward per training byte; the
  entropy model is frozen and only runs forward, in training as in inference.

Attention is counted over the keys a query really reads ("masked"): in a causal self-attention of
window W over L positions, query t reads min(t+1, W) keys; a patch's k encoder queries read the bytes
of that patch; a decoder byte reads the k keys of one patch. The kernels do a little more ("executed"):
a self-attention scores every key of the sequence when it fits in two windows, and otherwise blocks of
ceil(W/2) queries against the 3 blocks the window reaches; the encoder's patch attention scores each
byte against its patch's k queries with one matmul and sums values with a scatter-add, which is not a
matmul. `executed_forward_flops` counts the matmuls a forward pass runs, and equals
`torch.utils.flop_counter.FlopCounterMode`'s count (the tests check it).

Everything is plain arithmetic on the config: one `block_flops` for the one `TransformerBlock`, one
`cross_attention_flops` for the one `CrossAttention`, and one `_sequence_flops` that lays the BLT out.
"""

from __future__ import annotations

from blt.config import BLTConfig, EntropyModelConfig
from blt.errors import BltError

COMPONENTS = (
    "entropy_model",
    "local_encoder",
    "encoder_cross_attention",
    "global_transformer",
    "decoder_cross_attention",
    "local_decoder",
    "head",
)
ATTENTION_MODES = ("masked", "executed")


def matmul(m: float, k: float, n: float) -> float:
    """FLOPs of [m, k] @ [k, n]."""
    return 2 * m * k * n


def self_attention_keys(seq_len: float, window: int | None = None, attention: str = "masked") -> float:
    """Keys one query reads, averaged over the `seq_len` queries of a causal self-attention.

    masked:   mean over t = 0..L-1 of min(t+1, W) (W = None: no window), i.e. (L+1)/2 without a window.
    executed: L when the sequence fits in two windows (a dense or is_causal kernel scores every key);
              otherwise blocks of S = ceil(W/2) queries score (R+1)*S keys, R = ceil(W/S), with the
              queries padded to whole blocks (see `blt.model.transformer.windowed_attention`).
    """
    if attention not in ATTENTION_MODES:
        raise BltError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    if attention == "executed":
        if window is None or seq_len <= 2 * window:
            return seq_len
        size = max(1, (window + 1) // 2)
        reach = -(-window // size)
        n_blocks = -(-int(seq_len) // size)
        return n_blocks * size * (reach + 1) * size / seq_len
    w = seq_len if window is None else min(window, seq_len)
    # the first w queries read 1, 2, ..., w keys; the other L - w read w each
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def block_flops(dim: int, n_heads: int, n_kv_heads: int | None, ffn_dim: int, keys: float) -> float:
    """Forward FLOPs of one `TransformerBlock` for one token whose query reads `keys` keys."""
    head_dim = dim // n_heads
    kv_dim = (n_kv_heads or n_heads) * head_dim  # grouped-query attention shrinks wk and wv only
    projections = 2 * matmul(1, dim, n_heads * head_dim) + 2 * matmul(1, dim, kv_dim)  # wq, wo; wk, wv
    # QK^T ([1, hd] @ [hd, keys]) and AV ([1, keys] @ [keys, hd]) in every query head
    attention = n_heads * (matmul(1, head_dim, keys) + matmul(1, keys, head_dim))
    ffn = 3 * matmul(1, dim, ffn_dim)  # SwiGLU: w1, w3, w2
    return projections + attention + ffn


def cross_attention_flops(
    dim: int, n_queries: float, n_kv: float, keys_per_query: float, weighted_sum: bool = True
) -> float:
    """Forward FLOPs of one `CrossAttention` (heads * head_dim = dim, so the head count drops out):
    wq and wo on every query, wk and wv on every key/value row, and QK^T (+ AV when the weighted sum is
    a matmul) for every query."""
    scores = matmul(n_queries, dim, keys_per_query)
    return 2 * matmul(n_queries, dim, dim) + 2 * matmul(n_kv, dim, dim) + scores * (2 if weighted_sum else 1)


def dense_transformer_flops(
    dim: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int | None,
    ffn_dim: int,
    vocab: int,
    seq_len: float,
    window: int | None,
    attention: str = "masked",
) -> float:
    """Forward FLOPs per token of a stack of `n_layers` blocks over `seq_len` tokens plus its output
    head (`vocab` = 0: none). Serves the entropy model, a byte-level baseline, and each BLT stack."""
    keys = self_attention_keys(seq_len, window, attention)
    return n_layers * block_flops(dim, n_heads, n_kv_heads, ffn_dim, keys) + matmul(1, dim, vocab)


def entropy_model_flops(config: EntropyModelConfig, seq_bytes: int, attention: str = "masked") -> float:
    """Forward FLOPs per byte of the entropy model (or of any byte LM of that shape, e.g. a baseline
    with sliding_window=None) over sequences of `seq_bytes` bytes, output head included."""
    c = config
    return dense_transformer_flops(
        c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size, seq_bytes, c.sliding_window, attention
    )


def _sequence_flops(config: BLTConfig, n_bytes: float, n_patches: float, attention: str) -> dict[str, float]:
    """Forward FLOPs of the BLT (no entropy model) on one sequence of `n_bytes` bytes in `n_patches`
    patches, per component. The two attention modes differ only in how many keys each query reads."""
    c = config
    T, P, k = n_bytes, n_patches, c.cross_attn_k
    d_enc, d_glob, d_dec = c.dim_local_encoder, c.dim_global, c.dim_local_decoder
    ffn_enc, ffn_glob, ffn_dec = c.ffn_dims
    window = c.local_attention_window_len
    # encoder: each of a patch's k queries reads the bytes of its own patch; executed, that is one
    # score per (byte, query of its patch) and a scatter-add for the values (not a matmul)
    enc_cross_keys, enc_weighted_sum = T / P, attention == "masked"
    dec_cross_keys = k  # each byte reads the k keys of one patch, masked and executed alike
    n_cross_enc = c.n_layers_local_encoder if c.cross_attn_all_layers_encoder else 1
    n_cross_dec = c.n_layers_local_decoder if c.cross_attn_all_layers_decoder else 1
    in_proj = matmul(P, c.global_input_dim, d_glob) if c.global_input_dim != d_glob else 0
    return {
        "local_encoder": T
        * dense_transformer_flops(
            d_enc, c.n_layers_local_encoder, c.n_heads_local_encoder, c.n_kv_heads, ffn_enc, 0, T, window, attention
        ),
        # max-pool (free), then patch_projection d -> k*d once per patch; queries P*k, keys/values: the T bytes
        "encoder_cross_attention": matmul(P, d_enc, k * d_enc)
        + n_cross_enc * cross_attention_flops(d_enc, P * k, T, enc_cross_keys, enc_weighted_sum),
        # the global transformer runs once per patch, causal over all patches (no window)
        "global_transformer": in_proj
        + P
        * dense_transformer_flops(
            d_glob, c.n_layers_global, c.n_heads_global, c.n_kv_heads_global, ffn_glob, 0, P, None, attention
        ),
        # patch_projection d_global -> k*d once per patch; queries: the T bytes, keys/values: P*k
        "decoder_cross_attention": matmul(P, d_glob, k * d_dec)
        + n_cross_dec * cross_attention_flops(d_dec, T, P * k, dec_cross_keys),
        "local_decoder": T
        * dense_transformer_flops(
            d_dec, c.n_layers_local_decoder, c.n_heads_local_decoder, c.n_kv_heads, ffn_dec, 0, T, window, attention
        ),
        "head": matmul(T, d_dec, c.vocab_size),
    }


def component_flops(
    config: BLTConfig, seq_bytes: int, mean_patch_bytes: float, entropy_config: EntropyModelConfig | None = None
) -> dict[str, float]:
    """Forward FLOPs per byte of each component (keys: `COMPONENTS`, in that order), attention counted
    over the keys the masks let through, for sequences of `seq_bytes` bytes cut into patches of
    `mean_patch_bytes` bytes on average (P = seq_bytes / mean_patch_bytes patches)."""
    if seq_bytes < 1:
        raise BltError(f"seq_bytes must be >= 1, got {seq_bytes}")
    if mean_patch_bytes < 1:
        raise BltError(f"mean_patch_bytes must be >= 1 (a patch holds at least one byte), got {mean_patch_bytes}")
    totals = _sequence_flops(config, seq_bytes, seq_bytes / mean_patch_bytes, "masked")
    entropy = entropy_model_flops(entropy_config, seq_bytes) if entropy_config is not None else 0.0
    return {"entropy_model": entropy, **{name: flops / seq_bytes for name, flops in totals.items()}}


def flops_per_byte(
    config: BLTConfig, seq_bytes: int, mean_patch_bytes: float, entropy_config: EntropyModelConfig | None = None
) -> dict:
    """Inference and training FLOPs per byte, per component and in total.

    -> {"components": {name: {"inference": f, "training": 3f (f for the frozen entropy model)}},
        "inference_total": ..., "training_total": ...}
    """
    forward = component_flops(config, seq_bytes, mean_patch_bytes, entropy_config)
    components = {
        name: {"inference": f, "training": f if name == "entropy_model" else 3 * f} for name, f in forward.items()
    }
    return {
        "components": components,
        "inference_total": sum(v["inference"] for v in components.values()),
        "training_total": sum(v["training"] for v in components.values()),
    }


def executed_forward_flops(
    config: BLTConfig, seq_bytes: int, num_patches: int, entropy_config: EntropyModelConfig | None = None
) -> dict[str, int]:
    """Matmul FLOPs that one forward pass of `blt.BLT` executes on one sequence of `seq_bytes` bytes
    with `num_patches` patches (the model's count, which includes the slot of the byte after the
    sequence), per component, as the kernels run them (see the module docstring). Pass
    `entropy_config` when the entropy model runs in that forward (an `EntropyPatcher`, no explicit
    patches). Equals `FlopCounterMode`'s total with SDPA counted as its math backend does."""
    totals = _sequence_flops(config, seq_bytes, num_patches, "executed")
    entropy = (
        seq_bytes * entropy_model_flops(entropy_config, seq_bytes, "executed") if entropy_config is not None else 0
    )
    return {"entropy_model": entropy, **totals}


def format_table(report: dict) -> str:
    """A plain-text table of a `flops_per_byte` report."""
    header = ("component", "inference FLOPs/byte", "training FLOPs/byte")
    rows = [(name, f"{v['inference']:.2e}", f"{v['training']:.2e}") for name, v in report["components"].items()]
    rows.append(("total", f"{report['inference_total']:.2e}", f"{report['training_total']:.2e}"))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]

    def line(row) -> str:
        return f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}"

    rule = "-" * (sum(widths) + 4)
    return "\n".join([line(header), rule, *(line(r) for r in rows[:-1]), rule, line(rows[-1])])
