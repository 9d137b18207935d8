"""Model configurations: dataclasses that round-trip through JSON.

Field names follow the release's `ByteLatentTransformerArgs` where one exists, so that a reader can map
a released `params.json` onto these by eye (the README has the table).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blt.errors import BltError
from blt.tokenizer import VOCAB_SIZE

PATCHING_MODES = ("entropy", "static", "space", "bpe", "byte")


# float fields that may be zero or negative (all other numbers must be > 0)
SIGNED_FLOATS = {"threshold", "threshold_add"}
MAX_INT = 2**40  # far beyond any real width or length, small enough that products stay exact


def check_fields(obj) -> None:
    """Every field of a config dataclass has its declared type and a usable value: ints are ints (not bools
    or strings) >= 1, floats finite (and > 0 but for SIGNED_FLOATS), bools bools, lists of ints lists of
    positive ints; `| None` fields may be None. The message names the field and the value."""
    where = type(obj).__name__
    for f in dataclasses.fields(obj):
        value, kinds = getattr(obj, f.name), {k.strip() for k in str(f.type).split("|")}
        if value is None:
            if "None" not in kinds:
                raise BltError(f"{where}.{f.name} must be set, got null")
            continue
        if "bool" in kinds:
            ok = isinstance(value, bool)
        elif "int" in kinds:
            ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_INT
        elif "float" in kinds:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (f.name in SIGNED_FLOATS or value > 0)
        elif "str" in kinds:
            ok = isinstance(value, str)
        elif "list[int]" in kinds:
            ok = isinstance(value, (list, tuple)) and all(
                isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 64 for n in value
            )
        else:
            continue
        if not ok:
            want = next(iter(kinds - {"None"}))
            rule = {
                "int": "an integer >= 1",
                "float": "a finite number" if f.name in SIGNED_FLOATS else "a finite number > 0",
                "list[int]": "a list of integers in [1, 64]",
            }
            raise BltError(f"{where}.{f.name} must be {rule.get(want, 'a ' + want)}, got {value!r}")


def ffn_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """The release's SwiGLU width: 2/3 of 4*dim, scaled, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class PatchingConfig:
    """How a text is cut into patches (paper §2)."""

    mode: str = "entropy"
    # static: the stride in bytes; entropy: only a nominal size (the threshold decides)
    patch_size: float = 4.5
    # entropy: a patch starts where H(x_t) > threshold (global rule) ...
    threshold: float | None = 1.335442066192627
    # ... or where H(x_t) - H(x_{t-1}) > threshold (the approximate monotonic rule) ...
    monotonicity: bool = False
    # ... or where both H(x_t) > threshold and H(x_t) - H(x_{t-1}) > threshold_add (the combination)
    threshold_add: float | None = None
    # split any patch longer than this
    max_patch_length: int | None = None

    def __post_init__(self):
        check_fields(self)
        if self.mode not in PATCHING_MODES:
            raise BltError(f"unknown patching mode {self.mode!r}; valid modes: {', '.join(PATCHING_MODES)}")
        if self.mode == "static" and (self.patch_size < 1 or self.patch_size != int(self.patch_size)):
            raise BltError(f"static patching needs a whole patch_size >= 1, got {self.patch_size}")
        if self.max_patch_length is not None and self.max_patch_length < 1:
            raise BltError(f"max_patch_length must be >= 1, got {self.max_patch_length}")


@dataclass
class EntropyModelConfig:
    """The small byte LM whose next-byte entropy places patch boundaries (release defaults)."""

    vocab_size: int = VOCAB_SIZE
    dim: int = 768
    n_layers: int = 14
    n_heads: int = 12
    n_kv_heads: int | None = None
    ffn_dim: int | None = None  # None: the release's rule from multiple_of / ffn_dim_multiplier
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = 1.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = 512
    max_seqlen: int = 8192
    document_mask: bool = True  # no attention across EOS (the release's "local_block_causal")

    def __post_init__(self):
        check_fields(self)
        _check_heads("entropy model", self.dim, self.n_heads, self.n_kv_heads)

    @property
    def hidden_dim(self) -> int:
        return self.ffn_dim or ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EntropyModelConfig":
        return _from_dict(cls, d)


@dataclass
class BLTConfig:
    """A Byte Latent Transformer: local encoder -> global (latent) transformer -> local decoder."""

    vocab_size: int = VOCAB_SIZE
    # local encoder
    dim_local_encoder: int = 1024
    n_layers_local_encoder: int = 1
    n_heads_local_encoder: int = 16
    # global transformer over patches
    dim_global: int = 2048
    n_layers_global: int = 25
    n_heads_global: int = 16
    n_kv_heads_global: int | None = None
    # local decoder
    dim_local_decoder: int = 1024
    n_layers_local_decoder: int = 9
    n_heads_local_decoder: int = 16
    n_kv_heads: int | None = None  # local self-attention
    # feed-forward widths; None: the release's rule from multiple_of / ffn_dim_multiplier
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = 1.0
    ffn_dim_local_encoder: int | None = None
    ffn_dim_global: int | None = None
    ffn_dim_local_decoder: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # byte self-attention window of the local models; None: full causal attention
    local_attention_window_len: int | None = 512
    # no attention across EOS in the local models (release: always) and in the global one (block_causal)
    local_document_mask: bool = True
    global_document_mask: bool = False
    max_seqlen: int = 4096  # longest patch sequence the global transformer is meant for
    max_encoder_seq_length: int = 24576  # longest byte sequence
    # patch cross-attention: k queries (encoder) / keys (decoder) per patch
    cross_attn_k: int = 2
    cross_attn_nheads: int | None = 16  # None: the local model's own head count (transformers' port)
    cross_attn_all_layers_encoder: bool = False
    cross_attn_all_layers_decoder: bool = True
    # hash n-gram embeddings
    encoder_hash_byte_group_size: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 7, 8])
    encoder_hash_byte_group_vocab: int = 500002
    encoder_hash_byte_group_nb_functions: int = 1
    patching: PatchingConfig = field(default_factory=PatchingConfig)

    def __post_init__(self):
        if isinstance(self.patching, dict):
            self.patching = _from_dict(PatchingConfig, self.patching)
        if not isinstance(self.patching, PatchingConfig):
            raise BltError(f"BLTConfig.patching must be a patching object, got {self.patching!r}")
        check_fields(self)
        self.encoder_hash_byte_group_size = [int(n) for n in self.encoder_hash_byte_group_size]
        _check_heads("local encoder", self.dim_local_encoder, self.n_heads_local_encoder, self.n_kv_heads)
        _check_heads("global transformer", self.dim_global, self.n_heads_global, self.n_kv_heads_global)
        _check_heads("local decoder", self.dim_local_decoder, self.n_heads_local_decoder, self.n_kv_heads)
        if self.dim_local_encoder != self.dim_local_decoder:
            raise BltError(
                f"dim_local_encoder ({self.dim_local_encoder}) must equal dim_local_decoder "
                f"({self.dim_local_decoder}): "
                "the decoder reads the encoder's byte states"
            )
        if self.cross_attn_k < 1:
            raise BltError(f"cross_attn_k must be >= 1, got {self.cross_attn_k}")
        for name in ("cross_heads_encoder", "cross_heads_decoder"):
            heads = getattr(self, name)
            if self.dim_local_encoder % heads:
                raise BltError(f"local dim {self.dim_local_encoder} is not divisible by cross_attn_nheads={heads}")
        if any(n < 1 for n in self.encoder_hash_byte_group_size):
            raise BltError(f"n-gram sizes must be >= 1, got {self.encoder_hash_byte_group_size}")
        if self.local_attention_window_len is not None and self.local_attention_window_len < 1:
            raise BltError(f"local_attention_window_len must be >= 1 or None, got {self.local_attention_window_len}")

    # widths and head counts as the modules need them
    @property
    def ffn_dims(self) -> tuple[int, int, int]:
        def width(explicit: int | None, dim: int) -> int:
            return explicit or ffn_hidden_dim(dim, self.multiple_of, self.ffn_dim_multiplier)

        return (
            width(self.ffn_dim_local_encoder, self.dim_local_encoder),
            width(self.ffn_dim_global, self.dim_global),
            width(self.ffn_dim_local_decoder, self.dim_local_decoder),
        )

    @property
    def cross_heads_encoder(self) -> int:
        return self.cross_attn_nheads or self.n_heads_local_encoder

    @property
    def cross_heads_decoder(self) -> int:
        return self.cross_attn_nheads or self.n_heads_local_decoder

    @property
    def global_input_dim(self) -> int:
        """Width of a pooled patch entering the global transformer: k * d_encoder."""
        return self.cross_attn_k * self.dim_local_encoder

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BLTConfig":
        return _from_dict(cls, d)


def _check_heads(what: str, dim: int, n_heads: int, n_kv_heads: int | None) -> None:
    if dim % n_heads:
        raise BltError(f"{what}: dim {dim} is not divisible by n_heads {n_heads}")
    if n_kv_heads is not None and n_heads % n_kv_heads:
        raise BltError(f"{what}: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")


def _from_dict(cls, d: dict[str, Any]):
    if not isinstance(d, dict):
        raise BltError(f"a {cls.__name__} must be a JSON object, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise BltError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return cls(**d)


def save_json(obj: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
