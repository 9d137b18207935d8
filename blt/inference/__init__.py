"""Generation and scoring on top of the model.

kv_cache    windowed (ring buffer) and growing key/value caches with a typed pending write
decoding    the decoding state and the engine: prefill, one byte per row per step
sampling    argument checks, greedy / top-k / top-p sampling, stop strings
generate    generate, stream, score; GenerationMixin (model.generate / model.stream)
speculative exact speculative decoding: extend/accept over several bytes per pass, self and entropy-model drafts
reference   generate_recompute: the whole model over the whole prefix per byte (the exact reference)
"""

from blt.inference.decoding import DecodingState, IncrementalBLT
from blt.inference.generate import GenerationMixin, generate, score, stream
from blt.inference.reference import generate_recompute
from blt.inference.speculative import SpeculationStats, SpeculativeBLT

__all__ = [
    "DecodingState",
    "GenerationMixin",
    "IncrementalBLT",
    "SpeculationStats",
    "SpeculativeBLT",
    "generate",
    "generate_recompute",
    "score",
    "stream",
]
