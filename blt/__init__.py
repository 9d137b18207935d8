"""blt: the Byte Latent Transformer in plain PyTorch."""

from blt.checkpoint import convert, load_pretrained
from blt.config import BLTConfig, EntropyModelConfig, PatchingConfig
from blt.entropy_model import EntropyModel
from blt.errors import BltError
from blt.model import BLT
from blt.patching import (
    BpePatcher,
    BytePatcher,
    EntropyPatcher,
    Patcher,
    SpacePatcher,
    StaticPatcher,
    build_patcher,
    calibrate_threshold,
)
from blt.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, StreamDecoder, decode, encode, encode_batch

__all__ = [
    "BLT",
    "BLTConfig",
    "BltError",
    "BOS_ID",
    "BpePatcher",
    "BytePatcher",
    "EOS_ID",
    "EntropyModel",
    "EntropyModelConfig",
    "EntropyPatcher",
    "Patcher",
    "PatchingConfig",
    "SpacePatcher",
    "StaticPatcher",
    "StreamDecoder",
    "VOCAB_SIZE",
    "build_patcher",
    "calibrate_threshold",
    "convert",
    "decode",
    "encode",
    "encode_batch",
    "load_pretrained",
]
__version__ = "0.1.0"
