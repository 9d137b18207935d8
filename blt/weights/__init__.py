"""Weights in and out.

files       strict reading of JSON, safetensors and torch files; filling a module by a name map
ours        our directory layout (config.json + model.safetensors, entropy_model/, bpe_tokenizer.json)
hf          transformers' BltForCausalLM layout
release     the official release's layouts (hub-mixin and consolidated)
pretrained  `BLT` / `EntropyModel`: the network plus generate / stream / save_pretrained
load        load_blt, load_entropy_model, load_pretrained (dispatches), convert
"""

from blt.weights.hf import save_hf
from blt.weights.load import convert, load_blt, load_entropy_model, load_pretrained
from blt.weights.ours import save_blt, save_entropy_model
from blt.weights.pretrained import BLT, EntropyModel

__all__ = [
    "BLT",
    "EntropyModel",
    "convert",
    "load_blt",
    "load_entropy_model",
    "load_pretrained",
    "save_blt",
    "save_entropy_model",
    "save_hf",
]
