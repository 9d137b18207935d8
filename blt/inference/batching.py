"""Continuous batching: one thread decodes every running request as one batch; requests join and leave it
between steps.

A `Batcher` owns an `IncrementalBLT` and a thread. Each turn of the thread's loop:

    admit   waiting requests, while fewer than `max_rows` run: each is prefilled on its own and appended to the
            running batch (`IncrementalBLT.add_rows`); its first id is sampled from that prefill
    retire  rows that are done (EOS, a stop string, the byte budget) or whose request was cancelled (a client
            that went away) leave the batch (`IncrementalBLT.keep_rows`): their slots are freed at once
    step    one id for every running row (`IncrementalBLT.step`); each row samples its next id with its own
            temperature / top-k / top-p and its own generator

Why a request gets exactly what `model.generate([prompt], ...)` gives it alone: the engine keeps every row on its
own clock, with its own caches and patches, and never mixes rows; the prefill is the batch-of-one prefill that
`generate` runs for one prompt; sampling is `sample_next` over the row's own logits with a generator seeded as
`row_generators` seeds it; and the bytes a row keeps and shows follow `stream`'s rules (EOS, stop strings cut off
and held back while they may be beginning, the byte budget). One difference: a row whose global transformer is
full (max_seqlen patches) ends with finish_reason "length" where `generate` would raise.

A request's bytes go to a callback, called on the batcher's thread with each new piece (bytes) and last a
`Finished`. By default they go into a queue that iterating the `Request` drains (for synchronous callers); the
server passes a callback that hands them to its event loop.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from blt.errors import BltError
from blt.inference.decoding import IncrementalBLT
from blt.inference.sampling import StopChecker, allowed_ids, check_generation_args, row_generators, sample_next
from blt.model.blt import BLT
from blt.tokenizer import EOS_ID, OFFSET

log = logging.getLogger(__name__)


@dataclass
class Finished:
    """The last thing a request receives. `reason`: "stop" (EOS or a stop string), "length" (max bytes, or the
    global context full), "cancelled", or "error" (with `error`, e.g. a prompt longer than the model's context)."""

    reason: str
    error: str | None = None


class Request:
    """One completion: its settings, and the pieces of bytes the batcher sends it."""

    def __init__(
        self,
        prompt: bytes,
        max_new_bytes: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        seed: int | None,
        stop,
        stop_at_eos: bool,
        deliver: Callable[[bytes | Finished], None] | None,
    ):
        self.prompt, self.max_new_bytes, self.stop_at_eos = prompt, max_new_bytes, stop_at_eos
        self.temperature, self.top_k, self.top_p, self.seed = temperature, top_k, top_p, seed
        self.stopper = StopChecker(stop)
        self.events: queue.Queue[bytes | Finished] = queue.Queue()
        self.deliver = deliver or self.events.put
        self.cancelled = threading.Event()
        self.finished: Finished | None = None

    def cancel(self) -> None:
        """Give the row up: it leaves the batch before the next step."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[bytes]:
        """The new bytes piece by piece (only without a `deliver` callback); `finished` says how it ended."""
        while not isinstance(item := self.events.get(), Finished):
            yield item
        self.finished = item

    def _send(self, item: bytes | Finished) -> None:
        try:
            self.deliver(item)
        except Exception:  # the receiver is gone (e.g. its event loop closed): nobody waits for this row any more
            self.cancel()


class _Row:
    """A running request's progress: the bytes it made, those shown, the ids taken, its generator."""

    def __init__(self, request: Request, bpe: bool):
        self.request = request
        self.new = bytearray()
        self.shown = 0
        self.taken = 0
        self.budget = 2 * request.max_new_bytes + 16 if bpe else request.max_new_bytes  # delimiters add ids
        (self.generator,) = row_generators(request.seed, 1)
        self.reason: str | None = None  # why the row is done (None: running)

    def sample(self, logits: torch.Tensor, allowed: dict[bool, torch.Tensor]) -> int:
        r = self.request
        return int(sample_next(logits, allowed[r.stop_at_eos], r.temperature, r.top_k, r.top_p, [self.generator])[0])

    def take(self, nxt: int) -> None:
        """Add the id the row chose and send what can be shown (as `stream` does for one row)."""
        stopper, self.taken = self.request.stopper, self.taken + 1
        if nxt == EOS_ID:
            self.reason = "stop"
        elif nxt >= OFFSET:
            self.new.append(nxt - OFFSET)
            keep = stopper.cut(bytes(self.new))
            if keep is not None:
                del self.new[keep:]
                self.reason = "stop"
            elif len(self.new) >= self.request.max_new_bytes:
                self.reason = "length"
        if self.reason is None and self.taken >= self.budget:
            self.reason = "length"
        end = len(self.new) if self.reason else stopper.safe(bytes(self.new))
        if end > self.shown:
            self.request._send(bytes(self.new[self.shown : end]))
            self.shown = end


class Batcher:
    """Serves `submit`ted requests by continuous batching on its own thread (see the module docstring)."""

    def __init__(self, model: BLT, max_rows: int = 64):
        if not isinstance(max_rows, int) or max_rows < 1:
            raise BltError(f"max_rows must be a positive integer, got {max_rows!r}")
        model.eval()
        self.model, self.max_rows = model, max_rows
        self.engine = IncrementalBLT(model)
        self.bpe = model.patcher is not None and model.patcher.mode == "bpe"
        device = model.local_encoder.tok_embeddings.weight.device
        self.allowed = {eos: allowed_ids(eos, self.bpe, device) for eos in (True, False)}  # by stop_at_eos
        self.waiting: queue.Queue[Request | None] = queue.Queue()
        self.rows: list[_Row] = []
        self.next_ids: list[int] = []  # the id each row feeds at the next step
        self.peak_rows = 0  # the most rows decoded together so far
        self.finished: Counter[str] = Counter()  # requests ended, by reason
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, name="blt-batcher", daemon=True)
        self.thread.start()

    def submit(
        self,
        prompt: str | bytes,
        max_new_bytes: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop=None,
        stop_at_eos: bool = True,
        deliver: Callable[[bytes | Finished], None] | None = None,
    ) -> Request:
        """Queue one completion (the arguments of `generate`, for one prompt). Bad arguments raise `BltError`
        here; what goes wrong later (a prompt too long for the model) arrives as `Finished("error", ...)`."""
        if self.closed.is_set():
            raise BltError("the batcher is closed")
        (data,) = check_generation_args([prompt], max_new_bytes, temperature, top_k, top_p)
        request = Request(data, max_new_bytes, temperature, top_k, top_p, seed, stop, bool(stop_at_eos), deliver)
        self.waiting.put(request)
        return request

    @property
    def running(self) -> int:
        """Rows in the batch now."""
        return len(self.rows)

    def close(self) -> None:
        """Stop the thread; requests still running or waiting end with `Finished("cancelled")`."""
        self.closed.set()
        self.waiting.put(None)
        self.thread.join()

    # ---- the thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.no_grad():
            while not self.closed.is_set():
                try:
                    self._admit()
                    self._retire()
                    if self.rows:
                        self._step()
                except Exception as e:  # a failure inside a step: its rows end with the error, the server lives on
                    log.exception("blt batcher: a step failed; its %d rows end with the error", len(self.rows))
                    for row in self.rows:
                        self._finish(row.request, Finished("error", f"generation failed: {e}"))
                    self.rows, self.next_ids = [], []
                    self.engine = IncrementalBLT(self.model)
        for row in self.rows:
            self._finish(row.request, Finished("cancelled"))
        while (request := self._next(block=False)) is not None:
            self._finish(request, Finished("cancelled"))

    def _finish(self, request: Request, finished: Finished) -> None:
        self.finished[finished.reason] += 1
        request._send(finished)

    def _next(self, block: bool) -> Request | None:
        try:
            return self.waiting.get(block=block)
        except queue.Empty:
            return None

    def _admit(self) -> None:
        block = not self.rows  # idle: sleep until a request (or close) arrives
        while len(self.rows) < self.max_rows and not self.closed.is_set():
            request = self._next(block)
            if request is None:
                return
            block = False
            if request.cancelled.is_set():
                self._finish(request, Finished("cancelled"))
                continue
            try:
                logits = self.engine.add_rows([self.model.encode(request.prompt)])
            except BltError as e:  # nothing joined the batch
                self._finish(request, Finished("error", str(e)))
                continue
            except Exception as e:  # the batch may be broken too: `_run` ends every row
                self._finish(request, Finished("error", f"generation failed: {e}"))
                raise
            row = _Row(request, self.bpe)
            self.rows.append(row)
            self.next_ids.append(row.sample(logits, self.allowed))
            self.peak_rows = max(self.peak_rows, len(self.rows))
            row.take(self.next_ids[-1])

    def _retire(self) -> None:
        full = (self.engine.state.n_patches >= self.model.config.max_seqlen).tolist() if self.rows else []
        for row, is_full in zip(self.rows, full):
            if row.reason is None and is_full:
                row.reason = "length"  # the next patch would not fit in the global transformer
            if row.reason is None and row.request.cancelled.is_set():
                row.reason = "cancelled"
        keep = [i for i, row in enumerate(self.rows) if row.reason is None]
        if len(keep) == len(self.rows):
            return
        gone = [row for row in self.rows if row.reason is not None]
        self.engine.keep_rows(torch.tensor(keep, dtype=torch.long))
        self.rows = [self.rows[i] for i in keep]
        self.next_ids = [self.next_ids[i] for i in keep]
        for row in gone:  # told once their rows are free
            self._finish(row.request, Finished(row.reason))

    def _step(self) -> None:
        logits = self.engine.step(torch.tensor(self.next_ids))
        for i, row in enumerate(self.rows):
            self.next_ids[i] = row.sample(logits[i : i + 1], self.allowed)
            row.take(self.next_ids[i])
