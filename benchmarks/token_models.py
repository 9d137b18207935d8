"""BLT against token models that generate with a KV cache: text bytes per second, side by side with what
each model is worth.

- At equal training FLOPs (`flop_matched`): the comparison harness (`blt.experiments.compare`, its sizing
  rule and FLOP accounting) trains the project's BPE baseline and an entropy-patched BLT on the same data
  at the same budget; each gets its held-out bits per byte and its greedy text bytes/s. The BPE baseline is
  the entropy-model architecture over BPE tokens, a Llama (RMSNorm, SwiGLU, RoPE, no biases) with no
  generation loop of its own, so it generates as transformers' `LlamaForCausalLM` holding its weights
  (logits checked equal) with the KV cache: that row is both "the project's BPE baseline" and "a Llama at
  the FLOP-matched shape".
- At the 1B release shape with random weights (`release_shape`): BLT-1B (the release's dimensions, hash
  tables shrunk to 50,002 rows, ~4.5-byte patches) against Llama-3.2-1B's shape and a Llama with the global
  transformer's shape, both with a 128k vocabulary, at 4.4 bytes of text per token; float32 and bfloat16.
  With each model's weights read per byte or token and this machine's matrix-vector bandwidth, every
  stack's measured time is set against its floor (weights read / bandwidth).
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import torch
from speed import (
    generation_modes,
    matmul_chain_ms,
    matvec_bandwidth,
    mode_rate,
    random_blt,
    stack_times,
    stdlib_texts,
    step_matrices,
    timed,
    weights_read,
)

from blt.config import BLTConfig, EntropyModelConfig
from blt.tokenizer import BOS_ID, OFFSET

# ours: BOE, BOS, EOS, unused; a random Llama's EOS is 2: never generated, so every run has its full length
SPECIAL = [0, 1, 2, 3]
LLAMA_BYTES_PER_TOKEN = 4.4  # bytes of English text per Llama-3 token (an assumption, stated in the results)
LLAMA_VOCAB = 128_256
RELEASE_PROMPT, RELEASE_WARMUP = 100, 16  # BLT-1B's stepping: bytes prefilled, then steps left untimed


# ---- the BPE baseline as a transformers Llama -------------------------------------------------------
def as_llama(lm):
    """A token LM of the entropy-model architecture (`blt.EntropyModel`) as transformers' `LlamaForCausalLM`
    with the same weights. Our RoPE rotates adjacent pairs (x[2i], x[2i+1]), Llama's the halves
    (x[i], x[i + hd/2]): the rows of wq and wk are permuted from one order to the other in every head, which
    leaves every attention score as it was."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from blt.weights.hf import hf_name

    c = lm.config
    n_kv, head_dim = c.n_kv_heads or c.n_heads, c.dim // c.n_heads
    config = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.dim,
        intermediate_size=c.hidden_dim,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=n_kv,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        max_position_embeddings=c.max_seqlen,
        tie_word_embeddings=False,
    )

    def halves(w: torch.Tensor, heads: int) -> torch.Tensor:  # [heads * hd, D], pairs -> halves
        return w.unflatten(0, (heads, head_dim // 2, 2)).transpose(1, 2).flatten(0, 2)

    state = {}
    for name, w in lm.state_dict().items():
        if name.endswith("attn.wq.weight"):
            w = halves(w, c.n_heads)
        elif name.endswith("attn.wk.weight"):
            w = halves(w, n_kv)
        state["lm_head.weight" if name == "output.weight" else hf_name(name)] = w
    llama = LlamaForCausalLM(config)
    llama.load_state_dict(state)
    return llama.eval()


def llama_rate(llama, prompt_ids: torch.Tensor, n_tokens: int) -> tuple[float, torch.Tensor]:
    """(seconds, new ids) of greedy `generate` with the KV cache, after a short warm-up call."""

    def run(n):
        with torch.no_grad():
            return llama.generate(
                prompt_ids,
                max_new_tokens=n,
                do_sample=False,
                use_cache=True,
                suppress_tokens=SPECIAL,
                pad_token_id=0,
            )[0, prompt_ids.shape[1] :]

    run(2)
    return timed(lambda: run(n_tokens))


# ---- at equal training FLOPs ----------------------------------------------------------------------------
def flop_matched(data: list[str], budget: float, out: Path, n_bytes: int, entropy_steps: int) -> dict:
    """Train (or read back from `out`) the BPE baseline and an entropy-patched BLT at `budget` training FLOPs
    with the comparison harness; bpb and greedy text bytes/s of each, from a prompt of held-out text (the
    first 100 bytes of the last 20 KB, or 5%, of the first data file; the default tail split holds out 10%)."""
    from blt import load_pretrained
    from blt.bpe import load_bpe, token_ids
    from blt.experiments.baselines import token_byte_lengths
    from blt.experiments.compare import run_compare

    runs = {
        r["model"]: r
        for r in run_compare(data, [budget], ["bpe", "blt-entropy"], out, entropy_steps=entropy_steps, progress=False)
    }
    text = Path(data[0]).read_bytes()
    held_out = text[-min(20_000, len(text) // 20) :]
    prompt = held_out[:100]
    rows = []

    # the BPE baseline, as a Llama with its KV cache
    bpe, tokenizer = runs["bpe"], load_bpe(out / "bpe_tokenizer.json")
    lm = load_pretrained(out / "runs" / bpe["run"]).eval()
    llama = as_llama(lm)
    ids = torch.tensor([[BOS_ID] + [t + OFFSET for t in token_ids(tokenizer, prompt)]])
    with torch.no_grad():
        logit_gap = float((lm(ids) - llama(ids).logits).abs().max())
    n_tokens = round(n_bytes / bpe["bytes_per_unit"])
    seconds, new = llama_rate(llama, ids, n_tokens)
    text_bytes = int(token_byte_lengths(tokenizer)[new].sum())
    rows.append(
        {
            "model": "bpe baseline (as transformers LlamaForCausalLM, KV cache)",
            "width": bpe["width"],
            "params": bpe["params"],
            "bpb": bpe["bpb"],
            "inference_flops_per_byte": bpe["inference_flops_per_byte"],
            "bytes_per_token": text_bytes / len(new),
            "text_bytes_per_s": text_bytes / seconds,
            "tokens_per_s": len(new) / seconds,
            "max_logit_difference_ours_vs_llama": logit_gap,
        }
    )

    # BLT, in every generation mode it has
    ours = runs["blt-entropy"]
    model = load_pretrained(out / "runs" / ours["run"]).eval()
    modes, skipped = generation_modes(model)
    for name, kwargs in modes:
        rate = mode_rate(model, [prompt], n_bytes, kwargs)
        rows.append(
            {
                "model": f"blt-entropy ({name})",
                "width": ours["width"],
                "params": ours["params"],
                "bpb": ours["bpb"],
                "inference_flops_per_byte": ours["inference_flops_per_byte"],
                "bytes_per_patch": ours["bytes_per_unit"],
                "text_bytes_per_s": rate["bytes_per_s"],
                "warmup_seconds": rate["warmup_seconds"],
            }
        )
    best = max(r["text_bytes_per_s"] for r in rows[1:])
    return {
        "data": data,
        "budget_flops": budget,
        "new_bytes": n_bytes,
        "prompt_bytes": len(prompt),
        "rows": rows,
        "skipped_modes": skipped,
        "blt_step_breakdown": stack_times(model, held_out, n_steps=n_bytes),
        "blt_over_bpe_text_bytes_per_s": best / rows[0]["text_bytes_per_s"],
        "bpe_minus_blt_bpb": rows[0]["bpb"] - ours["bpb"],
    }


# ---- the 1B release shape --------------------------------------------------------------------------------
def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def release_configs(scale: int = 1) -> tuple[BLTConfig, EntropyModelConfig]:
    """BLT-1B's and its entropy model's shapes (the configs' defaults are the release's), hash tables of
    50,002 rows; with `scale` > 1 every width and head count divided by it (heads keep their width)."""
    c, e = BLTConfig(encoder_hash_byte_group_vocab=50_002), EntropyModelConfig()
    if scale == 1:
        return c, e
    c = dataclasses.replace(
        c,
        **{f: getattr(c, f) // scale for f in ("dim_local_encoder", "dim_local_decoder", "dim_global")},
        **{f: getattr(c, f) // scale for f in ("n_heads_local_encoder", "n_heads_local_decoder", "n_heads_global")},
        cross_attn_nheads=c.cross_attn_nheads // scale,
    )
    return c, dataclasses.replace(e, dim=e.dim // scale, n_heads=e.n_heads // scale)


def llama_configs(blt_config: BLTConfig, scale: int = 1) -> dict:
    """Llama-3.2-1B's shape, and a Llama of the global transformer's shape, with 128k vocabularies."""
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": 500_000.0}
    c = blt_config
    return {
        "llama-3.2-1b": LlamaConfig(
            vocab_size=LLAMA_VOCAB,
            hidden_size=2048 // scale,
            intermediate_size=8192 // scale,
            num_hidden_layers=16,
            num_attention_heads=32 // scale,
            num_key_value_heads=8 // scale,
            tie_word_embeddings=True,
            rope_parameters=rope,
        ),
        "llama-global-shape": LlamaConfig(
            vocab_size=LLAMA_VOCAB,
            hidden_size=c.dim_global,
            intermediate_size=c.ffn_dims[1],
            num_hidden_layers=c.n_layers_global,
            num_attention_heads=c.n_heads_global,
            num_key_value_heads=c.n_kv_heads_global or c.n_heads_global,
            tie_word_embeddings=False,
            rope_parameters=rope,
        ),
    }


def floor_percent(weight_bytes: float, bandwidth_gbs: float, measured_ms: float, chain_ms: float | None = None) -> dict:
    """A part's floor (its weights streamed once at the measured bandwidth) against its measured time; with
    `chain_ms`, also the time of its matrix products alone (`matmul_chain_ms`) against the measured time."""
    floor_ms = weight_bytes / (bandwidth_gbs * 1e9) * 1e3
    out = {
        "weights_mb": weight_bytes / 1e6,
        "floor_ms": floor_ms,
        "measured_ms": measured_ms,
        "percent_of_floor": 100 * floor_ms / measured_ms,
    }
    if chain_ms is not None:
        out["matmul_chain_ms"] = chain_ms
        out["chain_percent_of_floor"] = 100 * floor_ms / chain_ms
        out["percent_of_matmul_chain"] = 100 * chain_ms / measured_ms
    return out


def stack_floors(stacks: dict | None, weights: dict, bandwidth: float, chains: dict | None = None) -> dict | None:
    """Each part of a BLT step (`stack_times`) against its bandwidth floor, and the whole step per byte. `chains`:
    the per-byte parts' matrix-product chains (`matmul_chain_ms`), by part name as `stack_times` names them."""
    if stacks is None:
        return None
    ms, per_patch = stacks["ms_per_byte"], stacks["bytes_per_patch"]
    per_byte = [k for k in ("entropy_model", "local_encoder", "local_decoder") if k in weights]
    parts = {k: ms[k] for k in ("entropy_model", "local_encoder", "entropy_model+local_encoder") if k in ms}
    parts["local_decoder"] = ms["local_decoder"]
    floors = {
        part: floor_percent(sum(weights[k] for k in part.split("+")), bandwidth, measured, (chains or {}).get(part))
        for part, measured in parts.items()
    }
    floors["global_per_patch"] = floor_percent(weights["global"], bandwidth, ms["global"] * per_patch)
    floors["whole_step_per_byte"] = floor_percent(
        sum(weights[k] for k in per_byte) + weights["global"] / per_patch, bandwidth, ms["step"]
    )
    return floors


def blt_release_run(model, text: bytes, n_bytes: int, bandwidth: float, dtype) -> dict:
    """BLT-1B at batch 1: its time per stack stepping through `text` (eager, and compiled: there the entropy
    model and the local encoder are one graph, timed together) and each stack against its bandwidth floor;
    greedy text bytes/s from the first `RELEASE_PROMPT` bytes of `text` in every generation mode (with the bytes
    per patch of that output, which a random model makes at its own rate)."""
    steps = dict(n_steps=n_bytes, prompt_bytes=RELEASE_PROMPT, warmup=RELEASE_WARMUP)
    stacks = stack_times(model, text, **steps)  # the same bytes as compiled
    compiled = stack_times(model, text, compile=True, **steps)
    modes, skipped = generation_modes(model)
    rates = {}
    for name, kwargs in modes:
        # the warm-up is enough to compile every part
        r = mode_rate(model, [text[:RELEASE_PROMPT]], n_bytes, kwargs, warmup_bytes=RELEASE_WARMUP)
        rates[name] = {k: r[k] for k in ("bytes_per_s", "warmup_seconds", "mean_patch_bytes")}
    weights = weights_read(model)
    matrices = step_matrices(model)
    chains = {  # each part as the eager and the compiled steps time it
        part: matmul_chain_ms([w for k in part.split("+") for w in matrices[k]])
        for part in ("entropy_model", "local_encoder", "entropy_model+local_encoder", "local_decoder")
        if all(k in matrices for k in part.split("+"))
    }
    del matrices
    return {
        "dtype": dtype_name(dtype),
        "text_bytes_per_s": stacks["bytes_per_s"] if stacks else rates["eager"]["bytes_per_s"],
        "text_bytes_per_s_compiled": compiled["bytes_per_s"] if compiled else None,
        "generate": rates,
        "skipped_modes": skipped,
        "stack_times": stacks,
        "stack_times_compiled": compiled,
        "weights_read_mb": {k: v / 1e6 for k, v in weights.items()},
        "bandwidth_floor": stack_floors(stacks, weights, bandwidth, chains),
        "bandwidth_floor_compiled": stack_floors(compiled, weights, bandwidth, chains),
    }


def llama_release_run(config, n_tokens: int, bandwidth: float, dtype) -> dict:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(config).to(dtype).eval()
    params = sum(p.numel() for p in llama.parameters())
    element = torch.empty((), dtype=dtype).element_size()
    # per token: every matrix once; the embedding lookup reads one row unless the head is the embedding
    weight_bytes = element * (params - (0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size))
    prompt = torch.randint(4, config.vocab_size, (1, 24))
    seconds, new = llama_rate(llama, prompt, n_tokens)
    per_token_ms = seconds / len(new) * 1e3
    return {
        "dtype": dtype_name(dtype),
        "params": params,
        "tokens_per_s": len(new) / seconds,
        "text_bytes_per_s": len(new) * LLAMA_BYTES_PER_TOKEN / seconds,
        "weights_read_mb_per_text_byte": weight_bytes / LLAMA_BYTES_PER_TOKEN / 1e6,
        "bandwidth_floor_per_token": floor_percent(weight_bytes, bandwidth, per_token_ms),
    }


def release_shape(n_bytes: int, scale: int = 1, dtypes=(torch.float32, torch.bfloat16)) -> dict:
    """BLT-1B against the Llama shapes, batch 1, in each of `dtypes`. BLT's headline text bytes/s steps
    through standard-library text (its ~4.5-byte patches); Llama's generates greedily (its cost per token
    does not depend on the text)."""
    text = next(t for t in stdlib_texts() if len(t) > n_bytes + 200)
    bandwidth = {dtype_name(d): matvec_bandwidth(d) for d in dtypes}
    config, em_config = release_configs(scale)
    end = RELEASE_PROMPT + RELEASE_WARMUP + n_bytes  # the threshold is set on the bytes `stack_times` steps through
    model = random_blt(config, em_config, texts=[text[:end]], skip=RELEASE_PROMPT)
    blt = {
        "params": model.num_params(),
        "params_without_embeddings": model.num_params(embeddings=False),
        "entropy_model_params": sum(p.numel() for p in model.entropy_model.parameters()),
        "runs": [],
    }
    for dtype in dtypes:
        model.to(dtype)
        blt["runs"].append(blt_release_run(model, text, n_bytes, bandwidth[dtype_name(dtype)], dtype))
    del model
    gc.collect()
    n_tokens = max(4, round(n_bytes / LLAMA_BYTES_PER_TOKEN))
    llamas = {}
    for name, cfg in llama_configs(config, scale).items():
        llamas[name] = [llama_release_run(cfg, n_tokens, bandwidth[dtype_name(d)], d) for d in dtypes]
        gc.collect()
    return {
        "scale": scale,
        "new_bytes": n_bytes,
        "llama_bytes_per_token": LLAMA_BYTES_PER_TOKEN,
        "matvec_bandwidth_gb_per_s": bandwidth,
        "blt": blt,
        "llama": llamas,
    }
