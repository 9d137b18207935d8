"""The network and its patchers (paper §2-3), importing nothing above `blt.config`, `blt.tokenizer`,
`blt.bpe` and `blt.errors`.

    transformer         the one block (and attention) behind all four stacks, and the layer loop
    masks               attention masks, each a small function
    hash_embeddings     hash n-gram embeddings of the local encoder
    local_encoder       bytes -> byte states, pooled into patches by cross-attention
    global_transformer  the large model, run once per patch
    local_decoder       byte states + patch outputs -> next-byte logits
    entropy_model       the small byte LM whose entropy places patch boundaries
    patching            where patches start: byte, static, space, bpe, entropy
    blt                 the whole network: `BLT`
"""

from blt.model.blt import BLT, check_ids, init_weights
from blt.model.entropy_model import EntropyModel, entropy
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

__all__ = [
    "BLT",
    "BpePatcher",
    "BytePatcher",
    "EntropyModel",
    "EntropyPatcher",
    "Patcher",
    "SpacePatcher",
    "StaticPatcher",
    "build_patcher",
    "calibrate_threshold",
    "check_ids",
    "entropy",
    "init_weights",
]
