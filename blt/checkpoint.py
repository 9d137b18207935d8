"""Weights in and out: our directory format, transformers' BLT format, and the release's layouts.

Formats read by `load_pretrained` (a directory path; nothing is ever downloaded):
- ours:        config.json {"model_type": "blt_lm", ...} + model.safetensors; the entropy model in
               entropy_model/ (config.json {"model_type": "blt_lm_entropy"} + model.safetensors);
               bpe_tokenizer.json for the `bpe` patcher.
- transformers: config.json {"model_type": "blt", ...} + model.safetensors, as written by
               `BltForCausalLM.save_pretrained`; the entropy model lives inside, under `model.patcher.`.
- release, hub-mixin: config.json {"args": {...}} + model.safetensors (an entropy model folder has the
               same layout with the entropy model's args).
- release, consolidated: params.json + consolidated.pth ({"model": state_dict}, read with
               weights_only=True); the entropy model in entropy_model/ with its own params.json.
Loading is strict: every tensor in the file is used, every parameter is filled, shapes are checked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from blt.config import BLTConfig, EntropyModelConfig, PatchingConfig, save_json
from blt.entropy_model import EntropyModel
from blt.errors import BltError
from blt.model import BLT
from blt.patching import build_patcher

OURS, OURS_ENTROPY, HF, RELEASE_HUB, RELEASE_CONSOLIDATED = "ours", "ours-entropy", "transformers", "release-hub", "release-consolidated"
ENTROPY_DIRS = ("entropy_model", "entropy")


# ---- tensor names -------------------------------------------------------------------------------
# Each rule rewrites a dot-delimited piece of one of our parameter names into another format's name.
_RELEASE_RULES = [
    (r"^\.local_encoder\.hash_embeddings\.tables\.(\d+)\.", r".encoder_hash_tok_embedding.\1."),
    (r"\.layers\.(\d+)\.attn_norm\.", r".layers.\1.attention_norm."),
    (r"\.layers\.(\d+)\.attn\.", r".layers.\1.attention."),
    (r"\.layers\.(\d+)\.ffn\.", r".layers.\1.feed_forward."),
    (r"\.cross_attn\.(\d+)\.q_norm\.", r".cross_attn_layers.\1.cross_attn_norm_q."),
    (r"\.cross_attn\.(\d+)\.kv_norm\.", r".cross_attn_layers.\1.cross_attn_norm_kv."),
    (r"\.cross_attn\.(\d+)\.attn\.", r".cross_attn_layers.\1."),
    (r"\.patch_projection\.", ".patch_embedding_projection."),
    (r"^\.global_transformer\.in_proj\.", ".global_transformer.token_embedding_projection."),
]
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


def _rename(name: str, rules) -> str:
    name = "." + name
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name[1:]


def release_name(name: str) -> str:
    """Our parameter name -> the release's (BLT or entropy model)."""
    return _rename(name, _RELEASE_RULES)


def hf_name(name: str, entropy: bool = False) -> str:
    """Our parameter name -> transformers' BltForCausalLM name."""
    renamed = _rename(name, _HF_RULES)
    if entropy:
        return "model.patcher." + renamed
    return renamed[1:] if renamed.startswith("@") else "model." + renamed


def _own_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if not k.startswith("patcher.")}


# ---- reading files --------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BltError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BltError(f"{path} is not valid JSON: {e}") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BltError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise BltError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def _read_consolidated(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BltError(f"{path} is missing")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds of errors on a bad file
        raise BltError(f"{path} could not be read as a torch checkpoint (weights_only=True): {e}") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise BltError(f"{path} holds no state dict")
    return state


def _fill(module: torch.nn.Module, tensors: dict[str, torch.Tensor], names: dict[str, str], source: Path) -> None:
    """Copy file tensors into `module`, strictly. `names` maps our parameter name -> name in the file."""
    own = _own_state(module)
    missing = [names[k] for k in own if names[k] not in tensors]
    if missing:
        raise BltError(f"{source}: missing tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    used = set(names.values())
    unexpected = [k for k in tensors if k not in used]
    if unexpected:
        raise BltError(f"{source}: unexpected tensor(s) {', '.join(sorted(unexpected)[:5])}{' ...' if len(unexpected) > 5 else ''} (the config does not match the weights)")
    with torch.no_grad():
        for k, target in own.items():
            t = tensors[names[k]]
            if tuple(t.shape) != tuple(target.shape):
                raise BltError(f"{source}: tensor {names[k]} has shape {list(t.shape)}, the config expects {list(target.shape)}")
            target.copy_(t)


# ---- format detection -----------------------------------------------------------------------
def detect_format(path: Path) -> str:
    if not path.exists():
        raise BltError(f"{path} does not exist")
    if not path.is_dir():
        raise BltError(f"{path} is not a directory (a model is a directory with config.json + model.safetensors)")
    if (path / "config.json").is_file():
        cfg = _read_json(path / "config.json")
        if cfg.get("model_type") == "blt_lm":
            return OURS
        if cfg.get("model_type") == "blt_lm_entropy":
            return OURS_ENTROPY
        if cfg.get("model_type") == "blt":
            return HF
        if isinstance(cfg.get("args"), dict):
            return RELEASE_HUB
        raise BltError(f"{path / 'config.json'} is not a BLT config (model_type={cfg.get('model_type')!r})")
    if (path / "params.json").is_file():
        return RELEASE_CONSOLIDATED
    raise BltError(f"{path} is not a model directory: no config.json or params.json in it")


# ---- our format -----------------------------------------------------------------------------
def save_entropy_model(model: EntropyModel, path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_json({"model_type": "blt_lm_entropy", **model.config.to_dict()}, path / "config.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))


def patching_of(model: BLT) -> PatchingConfig:
    """The patching the model actually uses: its patcher's settings win over the config's."""
    p, c = model.patcher, model.config.patching
    if p is None:
        return c
    return PatchingConfig(
        mode=p.mode,
        patch_size=getattr(p, "patch_size", c.patch_size),
        threshold=getattr(p, "threshold", c.threshold if p.mode == "entropy" else None),
        threshold_add=getattr(p, "threshold_add", None),
        monotonicity=getattr(p, "monotonicity", False),
        max_patch_length=p.max_patch_length,
    )


def save_blt(model: BLT, path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(model.config, patching=patching_of(model))
    save_json({"model_type": "blt_lm", **config.to_dict()}, path / "config.json")
    save_file({k: v.contiguous() for k, v in _own_state(model).items()}, str(path / "model.safetensors"))
    if model.entropy_model is not None:
        save_entropy_model(model.entropy_model, path / "entropy_model")
    tokenizer = getattr(model.patcher, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save(str(path / "bpe_tokenizer.json"))


def _load_ours_entropy(path: Path) -> EntropyModel:
    cfg = _read_json(path / "config.json")
    cfg.pop("model_type", None)
    model = EntropyModel(EntropyModelConfig.from_dict(cfg))
    _fill(model, _read_safetensors(path / "model.safetensors"), {k: k for k in model.state_dict()}, path / "model.safetensors")
    return model


def _load_ours(path: Path) -> tuple[BLT, EntropyModel | None]:
    cfg = _read_json(path / "config.json")
    cfg.pop("model_type", None)
    model = BLT(BLTConfig.from_dict(cfg))
    _fill(model, _read_safetensors(path / "model.safetensors"), {k: k for k in _own_state(model)}, path / "model.safetensors")
    return model, None


# ---- transformers' format -------------------------------------------------------------------
def _hf_rope_theta(sub: dict, default: float) -> float:
    rope = sub.get("rope_parameters") or {}
    return float(rope.get("rope_theta", sub.get("rope_theta", default)))


def config_from_hf(cfg: dict) -> tuple[BLTConfig, EntropyModelConfig | None]:
    enc, dec, glb = cfg.get("encoder_config") or {}, cfg.get("decoder_config") or {}, cfg.get("global_config") or {}
    k = int(cfg.get("cross_attn_k", 2))
    for name, sub in (("encoder_config", enc), ("decoder_config", dec)):
        if int(sub.get("cross_attn_k", k)) != k:
            raise BltError(f"transformers config: cross_attn_k={k} but {name}.cross_attn_k={sub['cross_attn_k']}; they must agree")
    thetas = {_hf_rope_theta(s, 500000.0) for s in (enc, dec, glb)}
    if len(thetas) != 1:
        raise BltError(f"transformers config: the encoder, decoder and global rope_theta differ ({sorted(thetas)})")
    kv = lambda s: None if s.get("num_key_value_heads") in (None, s.get("num_attention_heads")) else int(s["num_key_value_heads"])  # noqa: E731
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


def _hash_tables_from_fused(tensors: dict, config: BLTConfig, source: Path) -> None:
    """transformers fuses the hash tables into one; split it back into one table per (function, n)."""
    if HF_HASH_KEY not in tensors:
        return
    fused = tensors.pop(HF_HASH_KEY)
    size = config.encoder_hash_byte_group_vocab
    n_tables = config.encoder_hash_byte_group_nb_functions * len(config.encoder_hash_byte_group_size)
    if fused.shape[0] != size * n_tables:
        raise BltError(f"{source}: tensor {HF_HASH_KEY} has {fused.shape[0]} rows, the config expects {size * n_tables}")
    for i in range(n_tables):
        tensors[f"model.encoder_hash_tok_embedding.{i}.weight"] = fused[i * size : (i + 1) * size]


def _hf_names(model: torch.nn.Module, entropy: bool = False) -> dict[str, str]:
    names = {}
    for k in _own_state(model):
        m = re.match(r"local_encoder\.hash_embeddings\.tables\.(\d+)\.weight$", k)
        names[k] = f"model.encoder_hash_tok_embedding.{m.group(1)}.weight" if m else hf_name(k, entropy)
    return names


def _load_hf(path: Path) -> tuple[BLT, EntropyModel | None]:
    config, entropy_config = config_from_hf(_read_json(path / "config.json"))
    source = path / "model.safetensors"
    tensors = _read_safetensors(source)
    _hash_tables_from_fused(tensors, config, source)
    model = BLT(config)
    entropy = EntropyModel(entropy_config) if entropy_config is not None and any(k.startswith("model.patcher.") for k in tensors) else None
    names = _hf_names(model)
    if entropy is not None:
        entropy_names = _hf_names(entropy, entropy=True)
        _fill(entropy, {k: v for k, v in tensors.items() if k.startswith("model.patcher.")}, entropy_names, source)
        tensors = {k: v for k, v in tensors.items() if not k.startswith("model.patcher.")}
    _fill(model, tensors, names, source)
    return model, entropy


def config_to_hf(config: BLTConfig, entropy: EntropyModelConfig | None) -> dict:
    c = config
    if c.cross_attn_nheads not in (None, c.n_heads_local_encoder) or c.cross_attn_nheads not in (None, c.n_heads_local_decoder):
        raise BltError(
            f"transformers' BLT uses the local head count for cross-attention; this model has cross_attn_nheads={c.cross_attn_nheads} "
            f"and {c.n_heads_local_encoder}/{c.n_heads_local_decoder} local heads"
        )
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    ffn = c.ffn_dims
    local = lambda dim, layers, heads, ffn_dim: dict(  # noqa: E731
        vocab_size=c.vocab_size, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=c.n_kv_heads or heads, intermediate_size=ffn_dim, rms_norm_eps=c.norm_eps,
        max_position_embeddings=c.max_encoder_seq_length, rope_parameters=rope, cross_attn_k=c.cross_attn_k, hidden_size_global=c.dim_global,
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
        "encoder_config": {**local(c.dim_local_encoder, c.n_layers_local_encoder, c.n_heads_local_encoder, ffn[0]), "cross_attn_all_layers": c.cross_attn_all_layers_encoder},
        "decoder_config": {**local(c.dim_local_decoder, c.n_layers_local_decoder, c.n_heads_local_decoder, ffn[2]), "cross_attn_all_layers": c.cross_attn_all_layers_decoder},
        "global_config": dict(
            hidden_size=c.dim_global, num_hidden_layers=c.n_layers_global, num_attention_heads=c.n_heads_global,
            num_key_value_heads=c.n_kv_heads_global or c.n_heads_global, intermediate_size=ffn[1], rms_norm_eps=c.norm_eps,
            max_position_embeddings=c.max_seqlen, rope_parameters=rope,
        ),
        "rope_parameters": rope,
        "tie_word_embeddings": False,
    }
    if entropy is not None:
        e = entropy
        out["patcher_config"] = dict(
            vocab_size=e.vocab_size, hidden_size=e.dim, num_hidden_layers=e.n_layers, num_attention_heads=e.n_heads,
            num_key_value_heads=e.n_kv_heads or e.n_heads, intermediate_size=e.hidden_dim, rms_norm_eps=e.norm_eps,
            max_position_embeddings=e.max_seqlen, sliding_window=e.sliding_window, rope_parameters={"rope_type": "default", "rope_theta": e.rope_theta},
        )
    return out


def save_hf(model: BLT, path: str | Path) -> None:
    """Write `model` in transformers' BltForCausalLM layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    entropy = model.entropy_model
    config = dataclasses.replace(model.config, patching=patching_of(model))
    save_json(config_to_hf(config, entropy.config if entropy is not None else None), path / "config.json")
    names = _hf_names(model)
    state = _own_state(model)
    tensors = {names[k]: v for k, v in state.items() if not k.startswith("local_encoder.hash_embeddings.")}
    tables = [state[k] for k in sorted((k for k in state if k.startswith("local_encoder.hash_embeddings.")), key=lambda k: int(k.split(".")[3]))]
    if tables:
        tensors[HF_HASH_KEY] = torch.cat(tables)
    if entropy is not None:
        tensors.update({hf_name(k, entropy=True): v for k, v in entropy.state_dict().items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))


# ---- the release's formats ------------------------------------------------------------------
_UNSUPPORTED_RELEASE = {
    # field: (value that we implement, what it means)
    "cross_attn_encoder": (True, "the local encoder pools patches by cross-attention"),
    "cross_attn_decoder": (True, "the local decoder reads patches by cross-attention"),
    "cross_attn_init_by_pooling": (True, "cross-attention queries start from pooled bytes"),
    "cross_attn_window_encoder": (None, "each patch attends to its own bytes only"),
    "cross_attn_window_decoder": (None, "each byte attends to one patch only"),
    "use_rope": (True, "rotary position embeddings"),
    "encoder_enable_byte_ngrams": (False, "hashed n-grams only, no n-gram lookup tables"),
    "encoder_ngram_to_size_str": (None, "hashed n-grams only, no n-gram lookup tables"),
    "pm_size": (0, "no extra vocabulary"),
    "weight_tying": (False, "untied output layer"),
    "tie_local_encoder_decoder_logits": (False, "untied output layer"),
    "norm_type": ("rmsnorm", "RMSNorm"),
    "non_linearity": ("swiglu", "SwiGLU"),
    "pre_norm": (True, "pre-norm blocks"),
}


def _release_patching(args: dict, patcher_args: dict | None) -> PatchingConfig:
    p = patcher_args or {}
    threshold = p.get("threshold", args.get("patching_threshold"))
    mode = p.get("patching_mode", args.get("patching_mode")) or "entropy"
    return PatchingConfig(
        mode=str(mode).split(".")[-1],
        patch_size=float(p.get("patch_size", args.get("patch_size")) or 4.5),
        threshold=None if threshold is None else float(threshold),
        threshold_add=p.get("threshold_add", args.get("patching_threshold_add")),
        monotonicity=bool(p.get("monotonicity", args.get("monotonicity", False))),
        max_patch_length=p.get("max_patch_length", args.get("max_patch_length")),
    )


def config_from_release(args: dict, patcher_args: dict | None = None) -> BLTConfig:
    """A release `ByteLatentTransformerArgs` dict -> BLTConfig; unsupported settings are named."""
    for key, (value, meaning) in _UNSUPPORTED_RELEASE.items():
        if key in args and args[key] is not None and args[key] != value:
            raise BltError(f"release config sets {key}={args[key]!r}; only {value!r} ({meaning}) is supported")
    dim_enc = int(args.get("dim_local_encoder", 512))
    if args.get("dim_token") not in (None, dim_enc):
        raise BltError(f"release config sets dim_token={args['dim_token']}; only dim_token = dim_local_encoder is supported")
    for dim, heads in ((dim_enc, args.get("n_heads_local_encoder", 8)), (args.get("dim_global", 512), args.get("n_heads_global", 8))):
        if args.get("head_dim") not in (None, dim // int(heads)):
            raise BltError(f"release config sets head_dim={args['head_dim']}; only dim / n_heads is supported")
    sizes = args.get("encoder_hash_byte_group_size") or []
    if isinstance(sizes, str):
        sizes = [int(x) for x in sizes.split(",") if x]
    return BLTConfig(
        vocab_size=int(args.get("vocab_size", 260)),
        dim_local_encoder=dim_enc,
        n_layers_local_encoder=int(args.get("n_layers_local_encoder", 8)),
        n_heads_local_encoder=int(args.get("n_heads_local_encoder", 8)),
        dim_global=int(args.get("dim_global", 512)),
        n_layers_global=int(args.get("n_layers_global", 8)),
        n_heads_global=int(args.get("n_heads_global", 8)),
        n_kv_heads_global=args.get("n_kv_heads_global"),
        dim_local_decoder=int(args.get("dim_local_decoder", 512)),
        n_layers_local_decoder=int(args.get("n_layers_local_decoder", 8)),
        n_heads_local_decoder=int(args.get("n_heads_local_decoder", 8)),
        n_kv_heads=args.get("n_kv_heads"),
        multiple_of=int(args.get("multiple_of", 256)),
        ffn_dim_multiplier=args.get("ffn_dim_multiplier", 1.0),
        norm_eps=float(args.get("norm_eps", 1e-5)),
        rope_theta=float(args.get("rope_theta", 10000.0)),
        local_attention_window_len=args.get("local_attention_window_len"),
        global_document_mask=args.get("attn_bias_type") == "block_causal",
        max_seqlen=int(args.get("max_seqlen", 1024)),
        max_encoder_seq_length=int(args.get("max_encoder_seq_length") or args.get("max_seqlen", 1024)),
        cross_attn_k=int(args.get("cross_attn_k") or 1),
        cross_attn_nheads=args.get("cross_attn_nheads"),
        cross_attn_all_layers_encoder=bool(args.get("cross_attn_all_layers_encoder", False)),
        cross_attn_all_layers_decoder=bool(args.get("cross_attn_all_layers_decoder", False)),
        encoder_hash_byte_group_size=[int(n) for n in sizes],
        encoder_hash_byte_group_vocab=int(args.get("encoder_hash_byte_group_vocab", 30000)),
        encoder_hash_byte_group_nb_functions=int(args.get("encoder_hash_byte_group_nb_functions", 3)) if sizes else 0,
        patching=_release_patching(args, patcher_args),
    )


def entropy_config_from_release(args: dict) -> EntropyModelConfig:
    """A release `LMTransformerArgs` dict -> EntropyModelConfig.

    The release's loader always runs its entropy model with a 512-byte sliding window and
    document-block masks, whatever the file says; so do we unless the file names a window.
    """
    return EntropyModelConfig(
        vocab_size=int(args.get("vocab_size", 260)),
        dim=int(args.get("dim", 512)),
        n_layers=int(args.get("n_layers", 8)),
        n_heads=int(args.get("n_heads") or int(args["dim"]) // int(args["head_dim"])),
        n_kv_heads=args.get("n_kv_heads"),
        multiple_of=int(args.get("multiple_of", 256)),
        ffn_dim_multiplier=args.get("ffn_dim_multiplier"),
        norm_eps=float(args.get("norm_eps", 1e-5)),
        rope_theta=float(args.get("rope_theta", 10000.0)),
        sliding_window=args.get("sliding_window") or 512,
        max_seqlen=int(args.get("max_seqlen", 8192)),
    )


def _release_entropy(path: Path) -> EntropyModel:
    """A release entropy-model folder, in either layout."""
    if (path / "params.json").is_file():
        params = _read_json(path / "params.json")
        args = params.get("entropy_model") or params.get("model") or {}
        source = path / "consolidated.pth"
        if not source.is_file() and (path / "consolidated" / "consolidated.pth").is_file():
            source = path / "consolidated" / "consolidated.pth"
        tensors = _read_consolidated(source)
    else:
        args = _read_json(path / "config.json").get("args") or {}
        source = path / "model.safetensors"
        tensors = _read_safetensors(source)
    model = EntropyModel(entropy_config_from_release(args))
    _fill(model, tensors, {k: release_name(k) for k in model.state_dict()}, source)
    return model


def _patcher_args(*dirs: Path) -> dict | None:
    for d in dirs:
        for name in ("params.json", "train_args.json"):
            if (d / name).is_file():
                p = (_read_json(d / name).get("data") or {}).get("patcher_args")
                if p:
                    return p
    return None


def _load_release(path: Path, fmt: str) -> tuple[BLT, EntropyModel | None]:
    entropy_dir = next((path / d for d in ENTROPY_DIRS if (path / d).is_dir()), None)
    patcher_args = _patcher_args(path, *( [entropy_dir] if entropy_dir else []))
    if fmt == RELEASE_CONSOLIDATED:
        params = _read_json(path / "params.json")
        if params.get("train_entropy_model"):
            raise BltError(f"{path} holds an entropy model, not a BLT; pass it as the entropy model")
        args = params.get("model")
        if not isinstance(args, dict):
            raise BltError(f"{path / 'params.json'} has no 'model' section")
        source = path / "consolidated.pth"
        tensors = _read_consolidated(source)
    else:
        args = _read_json(path / "config.json")["args"]
        if "dim_global" not in args:
            raise BltError(f"{path / 'config.json'} holds an entropy model, not a BLT; pass it as the entropy model")
        source = path / "model.safetensors"
        tensors = _read_safetensors(source)
    model = BLT(config_from_release(args, patcher_args))
    _fill(model, tensors, {k: release_name(k) for k in _own_state(model)}, source)
    entropy = _release_entropy(entropy_dir) if entropy_dir is not None else None
    return model, entropy


def _load_entropy(path: str | Path) -> EntropyModel:
    path = Path(path)
    fmt = detect_format(path)
    if fmt == OURS_ENTROPY:
        return _load_ours_entropy(path)
    if fmt in (RELEASE_HUB, RELEASE_CONSOLIDATED):
        return _release_entropy(path)
    raise BltError(f"{path} is not an entropy model directory")


# ---- public entry points --------------------------------------------------------------------
def load_pretrained(path: str | os.PathLike, entropy_model: str | os.PathLike | EntropyModel | None = None, device=None, dtype=None):
    """Load a BLT (with its patcher and entropy model attached) or a bare entropy model from a directory.

    `entropy_model` overrides the entropy model found beside the weights (a directory or a model).
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt == OURS_ENTROPY or (fmt == RELEASE_HUB and "dim_global" not in _read_json(path / "config.json")["args"]) or (
        fmt == RELEASE_CONSOLIDATED and _read_json(path / "params.json").get("train_entropy_model")
    ):
        model = _load_entropy(path)
        return model.to(device=device, dtype=dtype)
    if fmt == OURS:
        model, found = _load_ours(path)
        if (path / "entropy_model").is_dir():
            found = _load_ours_entropy(path / "entropy_model")
    elif fmt == HF:
        model, found = _load_hf(path)
    else:
        model, found = _load_release(path, fmt)
    if entropy_model is not None:
        found = entropy_model if isinstance(entropy_model, EntropyModel) else _load_entropy(entropy_model)
    tokenizer = None
    if (path / "bpe_tokenizer.json").is_file():
        from blt.bpe import load_bpe

        tokenizer = load_bpe(path / "bpe_tokenizer.json")
    model.patcher = build_patcher(model.config.patching, found, tokenizer)
    return model.to(device=device, dtype=dtype).eval()


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str = "ours", entropy_model=None) -> None:
    """Convert a model directory (any readable format) to ours or to transformers' layout."""
    model = load_pretrained(src, entropy_model=entropy_model)
    if isinstance(model, EntropyModel):
        if to != "ours":
            raise BltError("an entropy model alone can only be converted to our format")
        save_entropy_model(model, dst)
    elif to == "ours":
        save_blt(model, dst)
    elif to == "hf":
        save_hf(model, dst)
    else:
        raise BltError(f"unknown target format {to!r}; use 'ours' or 'hf'")
