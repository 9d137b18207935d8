"""lm-evaluation-harness adapter: `BLTLM`, the harness's model "blt".

    blt lm-eval --model blt --model_args pretrained=DIR --tasks hellaswag       the harness's command line
    lm_eval.simple_evaluate(model=BLTLM(pretrained=DIR), tasks=["hellaswag"])    from Python (or model="blt")

The harness (0.4) finds models in its own registry only (it reads no plugin entry points), so importing this
module registers the class, and `blt lm-eval ARGS` imports it and hands ARGS to the harness's own command line.

A byte-level model has no tokenizer: its tokens are bytes. Every count the harness takes in tokens is a count of
UTF-8 bytes here (`max_gen_toks`, `max_length`), and:

- `loglikelihood(context, continuation)`: ln p(continuation | BOS + context), summed over the continuation's bytes
  (for a bpe-patched model, with the delimiters among them), from the logits `blt score` computes
  (`blt.inference.next_logits`): its numbers, in nats instead of bits. `is_greedy`: every continuation id is the
  argmax over the ids generation may produce (bytes and EOS).
- `loglikelihood_rolling(text)`: ln p(text | BOS), each byte predicted from the whole text before it: one forward
  pass when the text fits, the cached engine past that (`blt score`'s total, in nats). With `max_length=N`, the
  harness's rolling windows of N bytes instead (each byte predicted once, from up to N - 1 bytes before it).
- `generate_until(context, {until, max_gen_toks, ...})`: `model.generate` (the cached engine) with the stop
  strings, at most `max_gen_toks` bytes; greedy unless `do_sample` / `temperature` say otherwise.

Normalized accuracy: the harness's `acc_norm` divides a choice's log-likelihood by the choice's length in
characters (`len(choice)`), not in the model's tokens; its `acc_bytes` divides by UTF-8 bytes, which for a byte
model is the per-token normalization. The two differ only on choices with non-ASCII characters.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import defaultdict

import torch
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from blt.errors import BltError
from blt.inference.generate import next_logits
from blt.inference.sampling import allowed_ids
from blt.model.blt import BLT
from blt.tokenizer import BOS_ID, OFFSET
from blt.weights import load_blt

log = logging.getLogger(__name__)


@register_model("blt")
class BLTLM(LM):
    """A BLT for the harness. `pretrained`: a model directory, a Hub repo id, or a loaded `BLT`."""

    def __init__(
        self,
        pretrained: str | BLT,
        entropy_model: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 8,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
    ):
        super().__init__()
        if isinstance(pretrained, BLT):
            model = pretrained
        else:
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model = load_blt(str(pretrained), entropy_model=entropy_model, device=device, dtype=_dtype(dtype))
        self.model = model.eval()
        self._device = model.local_encoder.tok_embeddings.weight.device
        if batch_size in ("auto", None):  # nothing to search: a byte model's batches are small
            batch_size = 8
        self.batch_size = _positive("batch_size", batch_size)
        if max_batch_size is not None:
            self.batch_size = min(self.batch_size, _positive("max_batch_size", max_batch_size))
        self.max_length = None if max_length is None else _positive("max_length", max_length)
        self.max_gen_toks = _positive("max_gen_toks", max_gen_toks)
        bpe = model.patcher is not None and model.patcher.mode == "bpe"
        self.allowed = allowed_ids(True, bpe, self._device)  # what greedy generation may pick

    # ---- the harness's three requests ------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        rows = [self._continuation(context, continuation) for context, continuation in (r.args for r in requests)]
        results = self._score(rows, "loglikelihood", disable_tqdm)
        for r, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", r.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        rows, owner = [], []  # (ids, how many of the last ids to score), and the request each row belongs to
        for i, r in enumerate(requests):
            ids = self.model.encode(r.args[0])
            if self.max_length is None or len(ids) <= self.max_length:
                rows.append((ids, len(ids) - 1))
                owner.append(i)
                continue
            for context, predicted in map(
                make_disjoint_window, get_rolling_token_windows(ids[1:].tolist(), BOS_ID, self.max_length, 1)
            ):
                rows.append((torch.tensor(context + predicted), len(predicted)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._score(rows, "loglikelihood_rolling", disable_tqdm)):
            totals[i] += logp
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups = defaultdict(list)  # requests with the same settings are generated together
        for i, r in enumerate(requests):
            context, gen_kwargs = r.args
            groups[json.dumps(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks), sort_keys=True)].append(i)
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for key, members in groups.items():
            kwargs = json.loads(key)
            n, until = kwargs.pop("max_gen_toks"), kwargs.pop("until")
            sampling = {"temperature": float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample") else 0.0}
            sampling |= {k: kwargs.pop(k) for k in ("top_k", "top_p") if k in kwargs}
            if kwargs:
                log.warning("blt: generation settings not used: %s", ", ".join(sorted(kwargs)))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                prompts = [self._prompt(requests[i].args[0], n) for i in chunk]
                for i, new in zip(chunk, self.model.generate(prompts, n, stop=until or None, **sampling)):
                    out[i] = new.decode("utf-8", errors="replace")
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(len(chunk))
        bar.close()
        return out

    # ---- shared --------------------------------------------------------------------------------------
    def _continuation(self, context: str, continuation: str) -> tuple[torch.Tensor, int]:
        """The ids of context + continuation, and how many of the last ones belong to the continuation: the ids
        after at least len(context) bytes (a bpe model's delimiter where the two meet is the continuation's)."""
        head = context.encode("utf-8")
        ids = self.model.encode(head + continuation.encode("utf-8"))
        is_byte = (ids >= OFFSET).long()
        before = is_byte.cumsum(0) - is_byte  # bytes before each id
        return ids, int((before[1:] >= len(head)).sum())

    def _prompt(self, context: str, n: int) -> bytes:
        """The context, its head cut so that it and n new bytes fit in `max_length` (when set)."""
        data = context.encode("utf-8")
        if self.max_length is None:
            return data
        if n >= self.max_length:
            raise BltError(f"max_gen_toks ({n} bytes) must be less than max_length ({self.max_length} bytes)")
        return data[-(self.max_length - n - 1) :] if len(data) > self.max_length - n - 1 else data  # BOS: 1

    @torch.no_grad()
    def _score(self, rows: list[tuple[torch.Tensor, int]], desc: str, disable: bool) -> list[tuple[float, bool]]:
        """For each (ids, n): ln p of the last n ids given the ids before them, and whether greedy decoding picks
        every one of them. Rows are run longest first, `batch_size` at a time."""
        results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        for start in tqdm(range(0, len(order), self.batch_size), desc=desc, disable=disable):
            chunk = [i for i in order[start : start + self.batch_size] if rows[i][1] > 0]
            for i, logits in zip(chunk, next_logits(self.model, [rows[i][0] for i in chunk]) if chunk else []):
                ids, n = rows[i]
                logits, targets = logits[-n:].float(), ids[-n:].to(logits.device)
                logp = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
                greedy = logits.masked_fill(~self.allowed, float("-inf")).argmax(-1) == targets
                results[i] = (float(logp.sum()), bool(greedy.all()))
        return results


def _positive(name: str, value) -> int:
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise BltError(f"{name} must be a positive integer, got {value!r}") from None
    if value < 1:
        raise BltError(f"{name} must be a positive integer, got {value!r}")
    return value


def _dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise BltError(f"dtype must be a floating-point torch dtype such as float32 or bfloat16, got {name!r}")
    return dtype


def cli(argv: list[str]) -> None:
    """The harness's command line (`lm-eval run ...`), with the model "blt" registered."""
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
