"""Generation and scoring on top of the model.

kv_cache    windowed (ring buffer) and growing key/value caches with a typed pending write
decoding    the decoding state and the engine: prefill, one byte per row per step
aot         step parts compiled ahead of time (torch.export + AOTInductor), the engine's compiled path on a CPU
sampling    argument checks, greedy / top-k / top-p sampling, stop strings
generate    generate, stream, score (and next_logits, batched); GenerationMixin (model.generate / model.stream)
batching    continuous batching: a thread decoding every running request as one batch, rows joining and leaving
speculative exact speculative decoding: extend/accept over several bytes per pass, self and entropy-model drafts
reference   generate_recompute: the whole model over the whole prefix per byte (the exact reference)
"""

from blt.inference.batching import Batcher
from blt.inference.decoding import DecodingState, IncrementalBLT
from blt.inference.generate import GenerationMixin, generate, next_logits, score, stream
from blt.inference.reference import generate_recompute
from blt.inference.speculative import SpeculationStats, SpeculativeBLT

__all__ = [
    "Batcher",
    "DecodingState",
    "GenerationMixin",
    "IncrementalBLT",
    "SpeculationStats",
    "SpeculativeBLT",
    "generate",
    "generate_recompute",
    "next_logits",
    "score",
    "stream",
]
