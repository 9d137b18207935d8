"""transformers' layout: config.json {"model_type": "blt", ...} + model.safetensors, as written by
`BltForCausalLM.save_pretrained`; the entropy model lives inside, under `model.patcher.`, and the hash n-gram
tables are fused into one."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from blt.config import BLTConfig, EntropyModelConfig, PatchingConfig, save_json
from blt.errors import BltError
from blt.model.blt import BLT
from blt.weights.files import rename
from blt.weights.ours import patching_of

PATCHER_PREFIX = "model.patcher."


_HF_RULES = [
    (r"\.tok_embeddings\.", ".embed_tokens."),
    (r"\.layers\.(\d+)\.attn_norm\.", r".layers.\1.input_layernorm."),
    (r"\.layers\.(\d+)\.ffn_norm\.", r".layers.\1.post_attention_layernorm."),
    (r"\.layers\.(\d+)\.attn\.w([qkvo])\.", r".layers.\1.self_attn.\2_proj."),
    (r"\.layers\.(\d+)\.ffn\.w1\.", r".layers.\1.mlp.gate_proj."),
    (r"\.layers\.(\d+)\.ffn\.w3\.", r".layers.\1.mlp.up_proj."),
    (r"\.layers\.(\d+)\.ffn\.w2\.", r".layers.\1.mlp.down_proj."),
    (r"\.cross_attn\.(\d+)\.kv_norm\.", r".cross_attn_layers.\1.k_norm."),
    (r"\.cross_attn\.(\d+)\.q_norm\.", r".cross_attn_layers.\1.q_norm."),
    (r"\.cross_attn\.(\d+)\.attn\.w([qkvo])\.", r".cross_attn_layers.\1.\2_proj."),
    (r"\.patch_projection\.", ".patch_embedding_projection."),
    (r"^\.global_transformer\.in_proj\.", ".global_transformer.token_embedding_projection."),
    (r"^\.local_decoder\.output\.", ".@lm_head."),
    (r"^\.output\.", ".lm_head."),
]


HF_HASH_KEY = "model.encoder_hash_tok_embedding.weight"


def hf_name(name: str, entropy: bool = False) -> str:
    """Our parameter name -> transformers' BltForCausalLM name."""
    renamed = rename(name, _HF_RULES)
    if entropy:
        return PATCHER_PREFIX + renamed
    return renamed[1:] if renamed.startswith("@") else "model." + renamed


def _hf_rope_theta(sub: dict, default: float) -> float:
    rope = sub.get("rope_parameters") or {}
    return float(rope.get("rope_theta", sub.get("rope_theta", default)))


def config_from_hf(cfg: dict) -> tuple[BLTConfig, EntropyModelConfig | None]:
    enc, dec, glb = cfg.get("encoder_config") or {}, cfg.get("decoder_config") or {}, cfg.get("global_config") or {}
    k = int(cfg.get("cross_attn_k", 2))
    for name, sub in (("encoder_config", enc), ("decoder_config", dec)):
        if int(sub.get("cross_attn_k", k)) != k:
            raise BltError(
                f"transformers config: cross_attn_k={k} but {name}.cross_attn_k={sub['cross_attn_k']}; they must agree"
            )
    thetas = {_hf_rope_theta(s, 500000.0) for s in (enc, dec, glb)}
    if len(thetas) != 1:
        raise BltError(f"transformers config: the encoder, decoder and global rope_theta differ ({sorted(thetas)})")

    def kv(s: dict) -> int | None:  # grouped-query heads, None when every head has its own keys
        heads = s.get("num_key_value_heads")
        return None if heads in (None, s.get("num_attention_heads")) else int(heads)

    if kv(enc) != kv(dec):
        raise BltError("transformers config: encoder and decoder num_key_value_heads differ; not supported")
    config = BLTConfig(
        vocab_size=int(cfg.get("vocab_size", 260)),
        dim_local_encoder=int(enc["hidden_size"]),
        n_layers_local_encoder=int(enc["num_hidden_layers"]),
        n_heads_local_encoder=int(enc["num_attention_heads"]),
        dim_global=int(glb["hidden_size"]),
        n_layers_global=int(glb["num_hidden_layers"]),
        n_heads_global=int(glb["num_attention_heads"]),
        n_kv_heads_global=kv(glb),
        dim_local_decoder=int(dec["hidden_size"]),
        n_layers_local_decoder=int(dec["num_hidden_layers"]),
        n_heads_local_decoder=int(dec["num_attention_heads"]),
        n_kv_heads=kv(enc),
        ffn_dim_local_encoder=int(enc["intermediate_size"]),
        ffn_dim_global=int(glb["intermediate_size"]),
        ffn_dim_local_decoder=int(dec["intermediate_size"]),
        norm_eps=float(enc.get("rms_norm_eps", 1e-5)),
        rope_theta=thetas.pop(),
        local_attention_window_len=cfg.get("local_attention_window_len"),
        max_seqlen=int(cfg.get("max_position_embeddings", 4096)),
        max_encoder_seq_length=int(enc.get("max_position_embeddings", 24576)),
        cross_attn_k=k,
        cross_attn_nheads=None,  # transformers' port: the local model's own head count
        cross_attn_all_layers_encoder=bool(enc.get("cross_attn_all_layers", False)),
        cross_attn_all_layers_decoder=bool(dec.get("cross_attn_all_layers", True)),
        encoder_hash_byte_group_size=list(cfg.get("encoder_hash_byte_group_size") or [3, 4, 5, 6, 7, 8]),
        encoder_hash_byte_group_vocab=int(cfg.get("encoder_hash_byte_group_vocab", 500002)),
        encoder_hash_byte_group_nb_functions=int(cfg.get("encoder_hash_byte_group_nb_functions", 1)),
        patching=PatchingConfig(
            mode=cfg.get("patching_mode") or "entropy",
            patch_size=float(cfg.get("patch_size") or 4.5),
            threshold=cfg.get("patching_threshold"),
            threshold_add=cfg.get("patching_threshold_add") or None,
            monotonicity=bool(cfg.get("monotonicity", False)),
            max_patch_length=cfg.get("max_patch_length"),
        ),
    )
    entropy = None
    p = cfg.get("patcher_config")
    if cfg.get("patch_in_forward", True) and p:
        entropy = EntropyModelConfig(
            vocab_size=int(p.get("vocab_size", 260)),
            dim=int(p["hidden_size"]),
            n_layers=int(p["num_hidden_layers"]),
            n_heads=int(p["num_attention_heads"]),
            n_kv_heads=kv(p),
            ffn_dim=int(p["intermediate_size"]),
            norm_eps=float(p.get("rms_norm_eps", 1e-5)),
            rope_theta=_hf_rope_theta(p, 10000.0),
            sliding_window=p.get("sliding_window"),
            max_seqlen=int(p.get("max_position_embeddings", 8192)),
        )
    return config, entropy


def split_fused_hash_tables(tensors: dict, config: BLTConfig, source: Path) -> None:
    """transformers fuses the hash tables into one; split it back into one table per (function, n)."""
    if HF_HASH_KEY not in tensors:
        return
    fused = tensors.pop(HF_HASH_KEY)
    size = config.encoder_hash_byte_group_vocab
    n_tables = config.encoder_hash_byte_group_nb_functions * len(config.encoder_hash_byte_group_size)
    if fused.shape[0] != size * n_tables:
        raise BltError(
            f"{source}: tensor {HF_HASH_KEY} has {fused.shape[0]} rows, the config expects {size * n_tables}"
        )
    for i in range(n_tables):
        tensors[f"model.encoder_hash_tok_embedding.{i}.weight"] = fused[i * size : (i + 1) * size]


def hf_names(model: torch.nn.Module, entropy: bool = False) -> dict[str, str]:
    names = {}
    for k in model.state_dict():
        m = re.match(r"local_encoder\.hash_embeddings\.tables\.(\d+)\.weight$", k)
        names[k] = f"model.encoder_hash_tok_embedding.{m.group(1)}.weight" if m else hf_name(k, entropy)
    return names


def config_to_hf(config: BLTConfig, entropy: EntropyModelConfig | None) -> dict:
    c = config
    if c.cross_attn_nheads not in (None, c.n_heads_local_encoder) or c.cross_attn_nheads not in (
        None,
        c.n_heads_local_decoder,
    ):
        raise BltError(
            "transformers' BLT uses the local head count for cross-attention; this model has "
            f"cross_attn_nheads={c.cross_attn_nheads} "
            f"and {c.n_heads_local_encoder}/{c.n_heads_local_decoder} local heads"
        )
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    ffn = c.ffn_dims
    local = lambda dim, layers, heads, ffn_dim: dict(  # noqa: E731
        vocab_size=c.vocab_size,
        hidden_size=dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=c.n_kv_heads or heads,
        intermediate_size=ffn_dim,
        rms_norm_eps=c.norm_eps,
        max_position_embeddings=c.max_encoder_seq_length,
        rope_parameters=rope,
        cross_attn_k=c.cross_attn_k,
        hidden_size_global=c.dim_global,
    )
    out = {
        "architectures": ["BltForCausalLM"],
        "model_type": "blt",
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_seqlen,
        "patch_in_forward": entropy is not None,
        "patch_size": int(c.patching.patch_size),  # transformers requires an int
        "patching_mode": c.patching.mode,
        "patching_threshold": c.patching.threshold,
        "max_patch_length": c.patching.max_patch_length,
        "local_attention_window_len": c.local_attention_window_len,
        "cross_attn_k": c.cross_attn_k,
        "encoder_hash_byte_group_size": list(c.encoder_hash_byte_group_size),
        "encoder_hash_byte_group_vocab": c.encoder_hash_byte_group_vocab,
        "encoder_hash_byte_group_nb_functions": c.encoder_hash_byte_group_nb_functions,
        "encoder_config": {
            **local(c.dim_local_encoder, c.n_layers_local_encoder, c.n_heads_local_encoder, ffn[0]),
            "cross_attn_all_layers": c.cross_attn_all_layers_encoder,
        },
        "decoder_config": {
            **local(c.dim_local_decoder, c.n_layers_local_decoder, c.n_heads_local_decoder, ffn[2]),
            "cross_attn_all_layers": c.cross_attn_all_layers_decoder,
        },
        "global_config": dict(
            hidden_size=c.dim_global,
            num_hidden_layers=c.n_layers_global,
            num_attention_heads=c.n_heads_global,
            num_key_value_heads=c.n_kv_heads_global or c.n_heads_global,
            intermediate_size=ffn[1],
            rms_norm_eps=c.norm_eps,
            max_position_embeddings=c.max_seqlen,
            rope_parameters=rope,
        ),
        "rope_parameters": rope,
        "tie_word_embeddings": False,
    }
    if entropy is not None:
        e = entropy
        out["patcher_config"] = dict(
            vocab_size=e.vocab_size,
            hidden_size=e.dim,
            num_hidden_layers=e.n_layers,
            num_attention_heads=e.n_heads,
            num_key_value_heads=e.n_kv_heads or e.n_heads,
            intermediate_size=e.hidden_dim,
            rms_norm_eps=e.norm_eps,
            max_position_embeddings=e.max_seqlen,
            sliding_window=e.sliding_window,
            rope_parameters={"rope_type": "default", "rope_theta": e.rope_theta},
        )
    return out


def save_hf(model: BLT, path: str | Path) -> None:
    """Write `model` in transformers' BltForCausalLM layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    entropy = model.entropy_model
    config = dataclasses.replace(model.config, patching=patching_of(model))
    save_json(config_to_hf(config, entropy.config if entropy is not None else None), path / "config.json")
    names = hf_names(model)
    state = model.state_dict()
    tensors = {names[k]: v for k, v in state.items() if not k.startswith("local_encoder.hash_embeddings.")}
    tables = [
        state[k]
        for k in sorted(
            (k for k in state if k.startswith("local_encoder.hash_embeddings.")), key=lambda k: int(k.split(".")[3])
        )
    ]
    if tables:
        tensors[HF_HASH_KEY] = torch.cat(tables)
    if entropy is not None:
        tensors.update({hf_name(k, entropy=True): v for k, v in entropy.state_dict().items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
