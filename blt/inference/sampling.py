"""What every generation path shares: argument checks, the ids it may produce, sampling with one
generator per row, and stop strings."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from blt.errors import BltError
from blt.tokenizer import BOE_ID, BOS_ID, BPE_ID, EOS_ID, OFFSET, VOCAB_SIZE, to_bytes


def check_generation_args(prompts, max_new_bytes: int, temperature: float, top_k, top_p) -> list[bytes]:
    """The prompts as bytes, after refusing any argument that could not generate sensibly (naming it)."""
    if isinstance(prompts, (str, bytes, bytearray)):
        raise BltError("prompts must be a list of str or bytes (wrap a single prompt in a list)")
    if not isinstance(prompts, (list, tuple)):
        raise BltError(f"prompts must be a list of str or bytes, got {type(prompts).__name__}")
    if not prompts:
        raise BltError("prompts is an empty list: give at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, (str, bytes, bytearray)):
            raise BltError(f"prompts[{i}] must be str or bytes, got {type(p).__name__}")
    if not _is_int(max_new_bytes) or max_new_bytes <= 0:
        raise BltError(f"max_new_bytes must be a positive integer, got {max_new_bytes!r}")
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise BltError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if 0 < temperature < MIN_TEMPERATURE:
        raise BltError(f"temperature {temperature!r} is too small to sample with; use 0 for greedy")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise BltError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise BltError(f"top_p must be in (0, 1], got {top_p!r}")
    return [to_bytes(p) for p in prompts]


MIN_TEMPERATURE = 1e-4  # below it logits / temperature overflow float32


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def allowed_ids(stop_at_eos: bool, bpe: bool, device=None) -> torch.Tensor:
    """[V] bool: the ids generation may produce. Bytes always; EOS only when it ends generation; the
    BPE delimiter only for a `bpe`-patched model, which needs it to open patches (it is never output)."""
    allowed = torch.zeros(VOCAB_SIZE, dtype=torch.bool, device=device)
    allowed[OFFSET:] = True
    allowed[EOS_ID] = stop_at_eos
    allowed[BPE_ID] = bpe
    assert not allowed[BOE_ID] and not allowed[BOS_ID]
    return allowed


def row_generators(seed: int | None, rows: int) -> list[torch.Generator | None]:
    """One generator per row, all seeded alike: a row samples exactly what it samples alone."""
    return [torch.Generator().manual_seed(seed) if seed is not None else None for _ in range(rows)]


def sample_next(
    logits: torch.Tensor,
    allowed: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """One id per row of `logits` [B, V]: greedy at temperature 0, else top-k / top-p sampling with
    each row's own generator."""
    logits = filtered_logits(logits, allowed, temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    probs = logits.softmax(-1).cpu()
    picks = [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)]
    return torch.cat(picks).to(logits.device)


def filtered_logits(
    logits: torch.Tensor, allowed: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """`logits` [..., V] as sampling sees them (float32): the ids not `allowed` at -inf, then (temperature > 0)
    divided by the temperature, top-k and top-p applied. Their softmax is the distribution sampled from."""
    logits = logits.float().masked_fill(~allowed, float("-inf"))
    if temperature == 0:
        return logits
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


class StopChecker:
    """Ends a row at EOS or when its new bytes end with one of the stop strings (which is cut off).
    While streaming, bytes that may be the start of a stop string are held back until they are not.
    `stop` is one string (str or bytes) or a sequence of them; a str is matched as its UTF-8 bytes."""

    def __init__(self, stop: str | bytes | Sequence[str | bytes] | None):
        if isinstance(stop, (str, bytes, bytearray)):
            stop = [stop]
        elif stop is not None and not isinstance(stop, (list, tuple)):
            raise BltError(f"stop must be a str, bytes or a list of them, got {type(stop).__name__}")
        for s in stop or []:
            if not isinstance(s, (str, bytes, bytearray)):
                raise BltError(f"each stop string must be str or bytes, got {s!r}")
        self.stops = [to_bytes(s) for s in (stop or []) if s]

    def cut(self, new: bytes) -> int | None:
        """Length to keep if `new` ends with a stop string, else None."""
        for s in self.stops:
            if new.endswith(s):
                return len(new) - len(s)
        return None

    def safe(self, new: bytes) -> int:
        """How many leading bytes of `new` can be shown: all but a tail that could begin a stop string."""
        held = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(new)), held, -1):
                if new.endswith(s[:n]):
                    held = n
                    break
        return len(new) - held
