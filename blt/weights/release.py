"""The official release's layouts: the hub-mixin one (config.json {"args": {...}} + model.safetensors) and the
consolidated one (params.json + consolidated.pth, read with weights_only=True); an entropy model in entropy_model/
(or entropy/) with the same layout and its own args."""

from __future__ import annotations

from pathlib import Path

import torch

from blt.config import BLTConfig, EntropyModelConfig, PatchingConfig
from blt.errors import BltError
from blt.weights.files import read_consolidated, read_json, read_safetensors, rename

ENTROPY_DIRS = ("entropy_model", "entropy")


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


def release_name(name: str) -> str:
    """Our parameter name -> the release's (BLT or entropy model)."""
    return rename(name, _RELEASE_RULES)


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
        raise BltError(
            f"release config sets dim_token={args['dim_token']}; only dim_token = dim_local_encoder is supported"
        )
    for dim, heads in (
        (dim_enc, args.get("n_heads_local_encoder", 8)),
        (args.get("dim_global", 512), args.get("n_heads_global", 8)),
    ):
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


def patcher_args(*dirs: Path) -> dict | None:
    for d in dirs:
        for name in ("params.json", "train_args.json"):
            if (d / name).is_file():
                p = (read_json(d / name).get("data") or {}).get("patcher_args")
                if p:
                    return p
    return None


def is_entropy_model(path: Path) -> bool:
    """Does a release-layout folder hold an entropy model rather than a BLT?"""
    if (path / "config.json").is_file():
        return "dim_global" not in (read_json(path / "config.json").get("args") or {})
    return bool(read_json(path / "params.json").get("train_entropy_model"))


def read_blt(path: Path) -> tuple[BLTConfig, dict[str, torch.Tensor], Path]:
    """The config, the tensors (release names) and the weights file of a release BLT folder."""
    entropy_dir = entropy_dir_of(path)
    patcher = patcher_args(path, *([entropy_dir] if entropy_dir else []))
    if (path / "config.json").is_file():
        args = read_json(path / "config.json")["args"]
        if "dim_global" not in args:
            raise BltError(f"{path / 'config.json'} holds an entropy model, not a BLT; pass it as the entropy model")
        source = path / "model.safetensors"
        tensors = read_safetensors(source)
    else:
        params = read_json(path / "params.json")
        if params.get("train_entropy_model"):
            raise BltError(f"{path} holds an entropy model, not a BLT; pass it as the entropy model")
        args = params.get("model")
        if not isinstance(args, dict):
            raise BltError(f"{path / 'params.json'} has no 'model' section")
        source = path / "consolidated.pth"
        tensors = read_consolidated(source)
    return config_from_release(args, patcher), tensors, source


def read_entropy_model(path: Path) -> tuple[EntropyModelConfig, dict[str, torch.Tensor], Path]:
    """The config, the tensors (release names) and the weights file of a release entropy-model folder."""
    if (path / "params.json").is_file():
        params = read_json(path / "params.json")
        args = params.get("entropy_model") or params.get("model") or {}
        source = path / "consolidated.pth"
        if not source.is_file() and (path / "consolidated" / "consolidated.pth").is_file():
            source = path / "consolidated" / "consolidated.pth"
        tensors = read_consolidated(source)
    else:
        args = read_json(path / "config.json").get("args") or {}
        source = path / "model.safetensors"
        tensors = read_safetensors(source)
    return entropy_config_from_release(args), tensors, source


def entropy_dir_of(path: Path) -> Path | None:
    return next((path / d for d in ENTROPY_DIRS if (path / d).is_dir()), None)
