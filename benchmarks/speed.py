"""Measuring tools shared by the generation benchmarks: bytes per second, the generation modes a model
offers, the time each BLT stack takes inside the engine's steps, the weights a step reads, this machine's
matrix-vector memory bandwidth, and the time a step's own matrix products take with nothing between them."""

from __future__ import annotations

import dataclasses
import functools
import gc
import inspect
import re
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from blt.model.transformer import FusedBlock

# generation modes other work adds to `model.generate`: (name, keyword arguments); absent ones are skipped
MODES = (("compile", {"compile": True}), ("speculate4", {"speculate": 4}))


def timed(fn) -> tuple[float, object]:
    """(seconds, result) of one call."""
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def generation_modes(model, left_out: dict[str, str] | None = None) -> tuple[list[tuple[str, dict]], dict[str, str]]:
    """The modes `model.generate` supports, eager first, and a note for each one it does not (or that the caller
    leaves out, `left_out`: mode -> why)."""
    params = inspect.signature(model.generate).parameters
    modes, skipped = [("eager", {})], dict(left_out or {})
    for name, kwargs in MODES:
        missing = [k for k in kwargs if k not in params]
        if missing:
            skipped[name] = f"model.generate has no {missing[0]!r} parameter yet"
        elif name not in skipped:
            modes.append((name, kwargs))
    return modes, skipped


def mode_rate(model, prompts, n_bytes: int, kwargs: dict, warmup_bytes: int = 32) -> dict:
    """Aggregate new bytes/s of greedy `model.generate` in one mode, after a short warm-up call (whose time,
    compilation included, is reported apart); the bytes per patch of the first row, and the outputs."""
    from blt.tokenizer import to_bytes

    warm, _ = timed(lambda: model.generate(prompts, warmup_bytes, stop_at_eos=False, **kwargs))
    gc.collect()  # an engine holds inference copies of the weights: at the 1B shape, gigabytes each
    seconds, out = timed(lambda: model.generate(prompts, n_bytes, stop_at_eos=False, **kwargs))
    gc.collect()
    return {
        "bytes_per_s": sum(map(len, out)) / seconds,
        "warmup_seconds": warm,
        "mean_patch_bytes": mean_patch_bytes(model, to_bytes(prompts[0]) + out[0]),
        "outputs": out,
    }


class StackClock:
    """Seconds each stack spends inside `IncrementalBLT.step`, measured from outside the engine by wrapping
    the calls that run a stack's blocks (`_run_blocks`), close patches (`close_part`: pooling, the global
    step and the decoder's new keys) and run the local decoder (`decoder_part`). The rest of a step
    (embeddings, the patch rule, the entropy model's head) is reported as `rest`.
    `available` is False when the engine no longer has these methods."""

    def __init__(self, engine):
        self.engine, self.seconds, self.steps = engine, defaultdict(float), 0
        self.available = all(
            hasattr(engine, a) for a in ("_run_blocks", "close_part", "decoder_part", "step", "enc_blocks")
        )

    def install(self) -> None:
        """Wrap the engine's methods (after `prefill`, which makes the fused blocks). A compiled engine runs the
        entropy model and the local encoder in one graph (`byte_part`): they are clocked together, as
        `entropy_model+local_encoder` (install it after the steps that compile every part)."""
        if not self.available:
            return
        e, seconds = self.engine, self.seconds
        names = {id(e.enc_blocks): "local_encoder"}
        if getattr(e, "em_blocks", None) is not None:
            names[id(e.em_blocks)] = "entropy_model"
        run_blocks, close, decode, step = e._run_blocks, e.close_part, e.decoder_part, e.step

        def clocked(name, fn):
            def call(*args, **kwargs):
                t = time.perf_counter()
                out = fn(*args, **kwargs)
                seconds[name or "unattributed"] += time.perf_counter() - t
                return out

            return call

        def blocks(b, *args, **kwargs):
            name = names.get(id(b))
            return clocked(name, run_blocks)(b, *args, **kwargs) if name else run_blocks(b, *args, **kwargs)

        def one_step(*args, **kwargs):
            self.steps += 1
            return clocked("step", step)(*args, **kwargs)

        if e.compile:
            e.byte_part = clocked("entropy_model+local_encoder", e.byte_part)
        else:
            e._run_blocks = blocks
        e.step = one_step
        e.close_part, e.decoder_part = clocked("global", close), clocked("local_decoder", decode)

    def per_byte(self) -> dict[str, float]:
        """Milliseconds per step (one byte per row) of each stack, and of the whole step."""
        s = dict(self.seconds)
        total = s.pop("step", 0.0)
        s["rest"] = total - sum(s.values())
        s["step"] = total
        return {k: v / max(1, self.steps) * 1e3 for k, v in s.items()}


def stack_times(
    model, text: bytes, n_steps: int, prompt_bytes: int = 100, warmup: int = 4, compile: bool = False
) -> dict | None:
    """Per-byte milliseconds of each stack at batch 1, prefilling the first `prompt_bytes` of `text` and then
    stepping through the next `n_steps` bytes of it (teacher forcing: a step costs what a greedy step costs,
    and the patches are those of real text, which a random model's own output is not); None where the
    engine's internals are not what `StackClock` wraps. The untimed warm-up runs `warmup` steps and goes on
    until it has closed a patch (in every mode, so that eager and compiled time the same bytes): a compiled
    engine compiles each part on its first call, which must not be timed."""
    from blt.inference import IncrementalBLT

    ids = model.encode(text)
    engine = IncrementalBLT(model, compile=compile)
    engine.prefill([ids[: prompt_bytes + 1]])
    clock = StackClock(engine)
    if not clock.available:
        return None
    feed = ids[prompt_bytes + 1 :, None]
    start, untimed = int(engine.state.n_patches[0]), 0
    while (untimed < warmup or int(engine.state.n_patches[0]) == start) and untimed < len(feed):
        engine.step(feed[untimed])
        untimed += 1
    if untimed + n_steps > len(feed):
        raise ValueError(f"the text is too short for {n_steps} timed steps after {untimed} untimed ones")
    clock.install()
    patches = int(engine.state.n_patches[0])
    for i in range(untimed, untimed + n_steps):
        engine.step(feed[i])
    closed = int(engine.state.n_patches[0]) - patches
    steps = n_steps
    ms = clock.per_byte()
    del engine, clock  # the clock's wrappers and the engine refer to each other: collect them now
    gc.collect()
    return {
        "ms_per_byte": ms,
        "bytes_per_s": 1e3 / ms["step"],
        "bytes_per_patch": steps / max(1, closed),
        "steps": steps,
    }


def mean_patch_bytes(model, text: bytes) -> float:
    """Bytes per patch of `text` (BOS included) under the model's patcher."""
    ids = model.encode(text)[None]
    return ids.shape[1] / int(model.patch_starts(ids)[:, : ids.shape[1]].sum())


def weights_read(model) -> dict[str, int]:
    """Bytes of weights each part of a BLT reads: per byte (entropy model, local encoder, local decoder) and per
    patch (`global`: pooling, the global transformer, the decoder's patch keys/values). Embedding lookups read
    one row and are left out."""
    parts = defaultdict(int)
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if "tok_embeddings" in name or "hash_embeddings" in name:
            continue
        if name.startswith("local_encoder.layers."):
            parts["local_encoder"] += size
        elif name.startswith("local_decoder.") and not re.match(
            r"local_decoder\.(patch_projection|cross_attn\.\d+\.(kv_norm|attn\.wk|attn\.wv))\.", name
        ):
            parts["local_decoder"] += size  # its layers, head, and the cross-attention's queries and output
        else:
            parts["global"] += size
    if model.entropy_model is not None:
        parts["entropy_model"] = sum(
            p.numel() * p.element_size()
            for n, p in model.entropy_model.named_parameters()
            if not n.startswith("tok_embeddings")
        )
    return dict(parts)


def matvec_bandwidth(dtype=torch.float32, megabytes: int = 256, repeats: int = 20) -> float:
    """GB/s at which `F.linear` of one vector streams a `megabytes` weight matrix of `dtype` (far beyond the
    caches): the memory bandwidth a batch-1 decode step can use. The best of `repeats` calls."""
    rows = 4096
    cols = megabytes * 2**20 // (rows * torch.empty((), dtype=dtype).element_size())
    weight = torch.randn(rows, cols).to(dtype)
    x = torch.randn(1, cols).to(dtype)
    F.linear(x, weight)
    best = min(timed(lambda: F.linear(x, weight))[0] for _ in range(repeats))
    return weight.numel() * weight.element_size() / best / 1e9


def step_matrices(model) -> dict[str, list[torch.Tensor]]:
    """The weight matrices a batch-1 decoding step multiplies one vector by, per per-byte part, as the engine holds
    them (`FusedBlock`: q/k/v fused, w1/w3 fused, [in, out] views): the local encoder's blocks; the local decoder's
    cross-attention queries and outputs, blocks and head; the entropy model's blocks and head."""

    def blocks(layers):
        return [w for b in map(FusedBlock, layers) for w in (b.wqkv, b.wo, b.w13, b.w2)]

    enc, dec = model.local_encoder, model.local_decoder
    cross = [w.detach().t() for x in dec.cross_attn for w in (x.attn.wq.weight, x.attn.wo.weight)]
    parts = {
        "local_encoder": blocks(enc.layers),
        "local_decoder": cross + blocks(dec.layers) + [dec.output.weight.detach().t()],
    }
    if model.entropy_model is not None:
        em = model.entropy_model
        parts["entropy_model"] = blocks(em.layers) + [em.output.weight.detach().t()]
    return parts


def matmul_chain_ms(matrices: list[torch.Tensor], repeats: int = 10) -> float:
    """Milliseconds to multiply one vector by each of `matrices` ([in, out]) in turn with nothing between them: the
    least a step that reads these weights takes with the library's matrix-vector products, whose bandwidth falls
    short of `matvec_bandwidth`'s on matrices of a few MB. The best of `repeats` chains."""
    inputs = {w.shape[0]: torch.randn(1, w.shape[0], dtype=w.dtype, device=w.device) for w in matrices}

    def chain():
        for w in matrices:
            torch.mm(inputs[w.shape[0]], w)

    chain()
    return min(timed(chain)[0] for _ in range(repeats)) * 1e3


@functools.cache
def stdlib_texts() -> list[bytes]:
    """The documents of `blt.experiments.corpus.stdlib_corpus()` (help topics, then docstrings), as bytes."""
    from blt.experiments.corpus import stdlib_corpus

    return [t.encode() for _, t in stdlib_corpus()]


def random_blt(config, em_config, texts: list[bytes] | None = None, mean_patch: float = 4.5, skip: int = 0):
    """A BLT of random weights with a random entropy model whose threshold gives ~`mean_patch`-byte patches
    over `texts` (default: the first standard-library documents of 511 bytes or more, cut to 511) from their
    byte `skip` on, each byte's entropy taken in the context of its whole text (a random model's entropies
    drift with the position, so the threshold is set on the bytes that will be stepped through). The
    entropy model's head is scaled up so that entropies vary from byte to byte, and the decoder's so that
    greedy output is not one repeated byte."""
    import blt
    from blt.config import PatchingConfig
    from blt.model.blt import init_weights
    from blt.model.patching import EntropyPatcher, threshold_for_mean_patch

    torch.manual_seed(0)
    em = blt.EntropyModel(em_config)
    init_weights(em)
    with torch.no_grad():
        em.output.weight.mul_(8.0)
    if texts is None:
        texts = [t[:511] for t in stdlib_texts()[:16] if len(t) >= 511]
    with torch.no_grad():
        # after BOS, entry i decides whether byte i starts a patch
        entropies = [em.entropies(blt.encode(t)[None])[0, skip:] for t in texts]
    theta = threshold_for_mean_patch(entropies, mean_patch)
    model = blt.BLT(
        dataclasses.replace(config, patching=PatchingConfig(mode="entropy", threshold=theta)),
        patcher=EntropyPatcher(em, theta),
    )
    with torch.no_grad():
        model.local_decoder.output.weight.mul_(4.0)
    return model.eval()
