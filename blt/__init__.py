"""blt: the Byte Latent Transformer in plain PyTorch.

The package in layers, each importing only from those below it:

    blt.errors, blt.tokenizer, blt.config, blt.bpe, blt.presets, blt.flops   shared ground
    blt.model         the network and its patchers
    blt.inference     caches, the decoding engine, generate / stream / score
    blt.weights       file layouts, load_pretrained / save_pretrained, convert
    blt.training      data, the loop, checkpoints, distributed, evaluation, recipes
    blt.experiments   FLOP-matched comparison, baselines, noise, pictures, the demo
    blt.cli           the `blt` command
"""

from blt.config import BLTConfig, EntropyModelConfig, PatchingConfig
from blt.errors import BltError
from blt.model.patching import (
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
from blt.weights import BLT, EntropyModel, convert, load_blt, load_entropy_model, load_pretrained

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
    "load_blt",
    "load_entropy_model",
    "load_pretrained",
]
__version__ = "0.1.0"
