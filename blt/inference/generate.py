"""Generation and scoring over the cached engine (`blt.inference.decoding`), and `GenerationMixin`, which
gives a model class `generate` / `stream` methods.

The mixin depends only on what a BLT provides (`encode`, `patcher`, the three stacks); the class that
mixes it in is defined above the model, in `blt.weights.pretrained` (see there for why).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from blt.errors import BltError
from blt.inference.decoding import IncrementalBLT
from blt.inference.sampling import StopChecker, allowed_ids, check_generation_args, row_generators, sample_next
from blt.inference.speculative import SpeculationStats, SpeculativeBLT, Speculator, check_speculation
from blt.model.blt import BLT
from blt.tokenizer import BOE_ID, EOS_ID, OFFSET


@torch.no_grad()
def stream(
    model: BLT,
    prompts: Sequence[str | bytes],
    max_new_bytes: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str | bytes] | None = None,
    stop_at_eos: bool = True,
    return_logits: bool = False,
    speculate: int = 0,
    draft: str = "self",
    stats: SpeculationStats | None = None,
    compile: bool = False,
) -> Iterator[list]:
    """Generate step by step. Each step yields one item per prompt: the bytes it added (b"" for a
    BPE delimiter), or (bytes, logits it sampled from) with `return_logits`; None once the row is done
    (EOS, a stop string, or `max_new_bytes`).

    `speculate=k` (> 0) drafts k bytes per step with `draft` ("self": the local models past the patch boundary,
    the default; "entropy": the entropy model) and keeps what the full model would produce, verified in one
    pass: the same bytes as plain decoding when greedy, the same distribution when sampling. A step then adds
    up to k+1 ids per row (with `return_logits`, their logits [m, V]); `stats` (a `SpeculationStats`) is
    filled with the acceptance counts. `compile` runs compiled steps (see `IncrementalBLT._compile`): ahead of time
    on a CPU, under torch.compile on a GPU; the first step of a batch size compiles (or loads what an earlier run
    compiled), the rest run the same code."""
    raw = check_generation_args(prompts, max_new_bytes, temperature, top_k, top_p)
    check_speculation(speculate, draft, model)
    if not isinstance(compile, bool):
        raise BltError(f"compile must be True or False, got {compile!r}")
    was_training = model.training
    model.eval()
    try:
        engine = (SpeculativeBLT if speculate else IncrementalBLT)(model, compile=compile)
        logits = engine.prefill([model.encode(p) for p in raw])
        bpe = model.patcher.mode == "bpe"
        allowed = allowed_ids(stop_at_eos, bpe, logits.device)
        generators = row_generators(seed, len(raw))
        stopper = StopChecker(stop)
        new = [bytearray() for _ in raw]
        shown = [0] * len(raw)  # bytes of `new` already yielded
        done = [False] * len(raw)
        taken = [0] * len(raw)  # ids each row has taken
        budget = 2 * max_new_bytes + 16 if bpe else max_new_bytes  # delimiters add steps, not bytes
        ids = sample_next(logits, allowed, temperature, top_k, top_p, generators)
        chosen = [[i] for i in ids.tolist()]
        step_logits = logits[:, None] if speculate else logits  # [B, m, V] or [B, V]: what chosen[b] came from
        if speculate:
            speculator = Speculator(engine, speculate, draft, allowed, temperature, top_k, top_p, generators, stats)
            speculator.stats.passes += len(raw)
            speculator.stats.produced += len(raw)
        while True:
            out = []
            for b in range(len(raw)):
                if done[b]:
                    out.append(None)
                    continue
                used = 0  # ids of chosen[b] taken before the row ended
                for nxt in chosen[b]:
                    taken[b], used = taken[b] + 1, used + 1
                    if nxt == EOS_ID:
                        done[b] = True
                    elif nxt >= OFFSET:
                        new[b].append(nxt - OFFSET)
                        keep = stopper.cut(bytes(new[b])) if stopper.stops else None
                        if keep is not None:
                            del new[b][keep:]
                            done[b] = True
                        done[b] = done[b] or len(new[b]) >= max_new_bytes
                    done[b] = done[b] or taken[b] >= budget
                    if done[b]:
                        break
                end = len(new[b]) if done[b] or not stopper.stops else stopper.safe(bytes(new[b]))
                piece, shown[b] = bytes(new[b][shown[b] : end]), max(shown[b], end)
                if return_logits:
                    row_logits = step_logits[b, :used] if speculate else step_logits[b]
                    out.append((piece, row_logits.float().cpu()))
                else:
                    out.append(piece)
            yield out
            if all(done):
                return
            active = torch.tensor([not d for d in done]) if any(done) else None  # None: every row
            if speculate:
                chosen, step_logits = speculator.round(ids, active)
                ids = torch.tensor([c[-1] for c in chosen])
            else:
                step_logits = engine.step(ids, active=active)
                ids = sample_next(step_logits, allowed, temperature, top_k, top_p, generators)
                chosen = [[i] for i in ids.tolist()]
    finally:
        model.train(was_training)


def generate(model: BLT, prompts: Sequence[str | bytes], max_new_bytes: int, return_logits: bool = False, **kwargs):
    """The new bytes of every prompt (with `return_logits`, also the logits of every id it chose [n, V])."""
    outputs = [bytearray() for _ in prompts]
    steps: list[list[torch.Tensor]] = [[] for _ in prompts]
    for items in stream(model, prompts, max_new_bytes, return_logits=return_logits, **kwargs):
        for b, item in enumerate(items):
            if item is None:
                continue
            if return_logits:
                item, logits = item
                steps[b].append(logits.reshape(-1, logits.shape[-1]))
            outputs[b] += item
    result = [bytes(o) for o in outputs]
    return (result, [torch.cat(s) for s in steps]) if return_logits else result


# ---- scoring ------------------------------------------------------------------------------------
@torch.no_grad()
def next_logits(model: BLT, rows: Sequence[torch.Tensor], max_forward: int | None = None) -> list[torch.Tensor]:
    """The logits after every id of each row but its last ([len - 1, V] per row of ids [len]).

    Rows that fit (`max_forward` ids, default the model's `max_encoder_seq_length`) run together in one forward
    pass, right-padded (everything is causal: padding changes nothing at the real positions); a longer row is
    prefilled up to that length and continued one byte at a time with the caches, so memory stays bounded and the
    numbers are those of the whole text."""
    device = model.local_encoder.tok_embeddings.weight.device
    limit = max_forward or model.config.max_encoder_seq_length
    out: list[torch.Tensor | None] = [None] * len(rows)
    short = [i for i, r in enumerate(rows) if len(r) <= limit]
    if short:
        ids = torch.full((len(short), max(len(rows[i]) for i in short)), BOE_ID, dtype=torch.long)
        for b, i in enumerate(short):
            ids[b, : len(rows[i])] = rows[i]
        logits = model(ids.to(device))
        for b, i in enumerate(short):
            out[i] = logits[b, : len(rows[i]) - 1]
    for i in (i for i, r in enumerate(rows) if len(r) > limit):
        ids = rows[i].to(device)
        engine = IncrementalBLT(model)
        steps = [engine.prefill([ids[:limit]], every_position=True)[0]]
        for p in tqdm(range(limit, len(ids) - 1), desc="score", unit="B", leave=False, disable=len(ids) - limit < 2000):
            steps.append(engine.step(ids[p : p + 1]))
        out[i] = torch.cat(steps)
    return out


@torch.no_grad()
def score(model: BLT, data: str | bytes, max_forward: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log2 p of every id of `data` after BOS given the ids before it, and which of them are bytes.

    A text that fits (`max_forward` ids, default the model's `max_encoder_seq_length`) takes one
    forward pass; a longer one is prefilled up to that length and continued one byte at a time with
    the caches, so memory stays bounded and the numbers are those of the whole text (`next_logits`).
    """
    model.eval()
    ids = model.encode(data)
    if len(ids) < 2:
        raise BltError("nothing to score: the text is empty")
    (logits,) = next_logits(model, [ids], max_forward)
    targets = ids[1:].to(logits.device)
    logp = torch.log_softmax(logits.float(), -1).gather(1, targets[:, None])[:, 0] / torch.log(torch.tensor(2.0))
    return logp.cpu(), (targets >= OFFSET).cpu()


class GenerationMixin:
    """`generate` and `stream` as methods of a BLT."""

    def generate(
        self,
        prompts,
        max_new_bytes: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop=None,
        stop_at_eos: bool = True,
        speculate: int = 0,
        draft: str = "self",
        stats: SpeculationStats | None = None,
        compile: bool = False,
    ) -> list[bytes]:
        """The new bytes for each prompt (str or bytes), with caches at every level.

        Greedy at temperature 0, else top-k / top-p sampling; a fixed `seed` reproduces a run, and each
        prompt of a batch gets exactly what it gets alone. Only bytes are produced, and EOS when
        `stop_at_eos` (it ends the row); `stop` strings end a row too and are left out.

        `speculate=k` drafts k bytes at a time (`draft`: "self", the local models past the patch boundary, the
        default; or "entropy", the entropy model) and verifies them in one pass of the whole model: the same
        bytes when greedy, the same distribution when sampling; pass a `SpeculationStats` as `stats` to get the
        acceptance rate and bytes per full-model pass. `compile` runs compiled decoding
        steps (same output; the first call of a batch size compiles, or loads what an earlier run compiled).
        """
        return generate(
            self,
            prompts,
            max_new_bytes,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            stop_at_eos=stop_at_eos,
            speculate=speculate,
            draft=draft,
            stats=stats,
            compile=compile,
        )

    def stream(self, prompts, max_new_bytes: int, **kwargs) -> Iterator[list]:
        """`generate`, step by step: yields one item per prompt per step (see `blt.inference.stream`)."""
        return stream(self, prompts, max_new_bytes, **kwargs)
