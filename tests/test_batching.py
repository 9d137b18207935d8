"""Continuous batching: rows join and leave a running batch, and each request gets what `generate` gives it alone."""

import pytest
import torch

import blt
from blt.config import PatchingConfig
from blt.errors import BltError
from blt.inference.batching import Batcher
from blt.inference.decoding import IncrementalBLT
from tests.helpers import TEXT, generation_model, tiny_config


@pytest.mark.parametrize("name", ["space", "bpe", "entropy-max-length"])
def test_requests_joining_a_running_batch_get_what_they_get_alone(name):
    model = generation_model(name)
    batcher = Batcher(model, max_rows=3)  # fewer rows than requests: some wait, then join mid-run
    try:
        jobs = []
        for i in range(8):
            prompt = f"request {i}: é " * (1 + i % 3)  # different lengths: every row on its own clock
            kwargs = {"temperature": 0.0 if i % 2 == 0 else 0.9, "seed": i, "top_k": 20 if i % 3 == 0 else None}
            kwargs["stop"] = ["e"] if i % 4 == 1 else None
            jobs.append((prompt, 10 + 4 * i, kwargs, batcher.submit(prompt, 10 + 4 * i, **kwargs)))
        for prompt, n, kwargs, request in jobs:
            assert b"".join(request) == model.generate([prompt], n, **kwargs)[0], (prompt, kwargs)
            assert request.finished.reason in ("stop", "length")
        assert batcher.peak_rows == 3
    finally:
        batcher.close()


def test_a_cancelled_request_frees_its_row_and_the_others_go_on():
    model = generation_model("static")
    batcher = Batcher(model)
    try:
        gone = batcher.submit("abandoned", 100_000, stop_at_eos=False)
        kept = batcher.submit("kept", 60, temperature=0.7, seed=3)
        pieces = iter(gone)
        next(pieces)
        gone.cancel()
        list(pieces)  # whatever was sent before the cancel arrived, then the end:
        assert gone.finished.reason == "cancelled"
        assert b"".join(kept) == model.generate(["kept"], 60, temperature=0.7, seed=3)[0]
        assert batcher.running == 0 and batcher.finished["cancelled"] == 1
    finally:
        batcher.close()


def test_a_full_global_context_ends_the_row_with_length():
    torch.manual_seed(0)
    config = tiny_config(max_seqlen=6, patching=PatchingConfig(mode="static", patch_size=4))
    model = blt.BLT(config).eval()
    alone = b""
    with pytest.raises(BltError, match="max_seqlen"):  # generate raises once the 7th patch would close ...
        for (piece,) in model.stream(["ab"], 100, stop_at_eos=False):
            alone += piece or b""
    batcher = Batcher(model)
    try:
        request = batcher.submit("ab", 100, stop_at_eos=False)
        out = b"".join(request)
        assert request.finished.reason == "length"  # ... the batcher ends the row before, keeping what it made
        assert len(out) > 0 and alone.startswith(out)
    finally:
        batcher.close()


def test_bad_requests():
    model = generation_model("static")
    batcher = Batcher(model)
    try:
        with pytest.raises(BltError, match="max_new_bytes"):
            batcher.submit("a", 0)
        with pytest.raises(BltError, match="temperature"):
            batcher.submit("a", 4, temperature=-1.0)
        too_long = batcher.submit("z" * (4 * model.config.max_seqlen + 8), 4)  # more patches than the context
        assert list(too_long) == [] and too_long.finished.reason == "error" and "max_seqlen" in too_long.finished.error
        assert b"".join(batcher.submit("fine", 5)) == model.generate(["fine"], 5)[0]  # the batcher lives on
    finally:
        batcher.close()
    with pytest.raises(BltError, match="closed"):
        batcher.submit("a", 4)


def test_engine_rows_joining_and_leaving_match_each_row_alone():
    """IncrementalBLT.add_rows / keep_rows: the logits of every row of a batch that changes between steps are
    those of the row decoded alone (the entropy patcher: patch state, entropies and caches all move with a row)."""
    model = generation_model("entropy-global")
    texts = {"a": TEXT[:40], "b": TEXT[50:53], "c": TEXT[60:100]}
    feeds = {k: model.encode(t + TEXT[:30])[len(model.encode(t)) :] for k, t in texts.items()}  # ids fed per step

    def alone(key, steps):
        engine = IncrementalBLT(model)
        out = [engine.prefill([model.encode(texts[key])])[0]]
        for i in range(steps):
            out.append(engine.step(feeds[key][i : i + 1])[0])
        return out

    engine, rows, got = IncrementalBLT(model), [], {k: [] for k in texts}
    for step, (joining, leaving) in enumerate([("a", None), ("b", None), (None, None), ("c", "a"), (None, "b")]):
        if leaving:
            engine.keep_rows(torch.tensor([i for i, k in enumerate(rows) if k != leaving]))
            rows.remove(leaving)
        if rows:
            logits = engine.step(torch.stack([feeds[k][len(got[k]) - 1] for k in rows]))
            for k, row_logits in zip(rows, logits):
                got[k].append(row_logits)
        if joining:
            got[joining].append(engine.add_rows([model.encode(texts[joining])])[0])
            rows.append(joining)
    for k, steps in got.items():
        for mine, reference in zip(steps, alone(k, len(steps) - 1)):
            torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-5)
    assert [len(s) for s in got.values()] == [3, 3, 2]
