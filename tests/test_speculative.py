"""Speculative decoding is exact: greedy output byte-identical to plain cached decoding (and to recomputing
everything) for every patcher, k and draft; a batch gives each row what it gets alone; seeded sampling
reproduces; speculative sampling has plain sampling's distribution; `extend` + `accept` leave the state that
stepping the kept bytes one by one leaves."""

import functools

import pytest
import torch

import blt
from blt.config import PatchingConfig
from blt.inference import IncrementalBLT, SpeculationStats, SpeculativeBLT, generate, generate_recompute
from tests.helpers import PATCHERS, TEXT, tiny_config

SHORT, LONG = "It was", TEXT[:90]  # shorter and longer than the 16-byte local window (and the entropy model's)
ENTROPY = [name for name in PATCHERS if name.startswith("entropy")]


@functools.cache
def make_model(name, window=16):
    patcher = PATCHERS[name]()
    torch.manual_seed(0)
    config = tiny_config(
        patching=PatchingConfig(mode=patcher.mode, patch_size=4), max_seqlen=2048, local_attention_window_len=window
    )
    model = blt.BLT(config, patcher=patcher).eval()
    with torch.no_grad():  # a peaked next-byte distribution: greedy choices are clear-cut, texts vary
        model.local_decoder.output.weight.mul_(4.0)
    return model


@functools.cache
def plain(name, window=16, n=512):
    return generate(make_model(name, window), [SHORT, LONG], n, stop_at_eos=False)


def check_greedy(name, draft, ks, n):
    if draft == "entropy" and name not in ENTROPY:
        pytest.skip("only an entropy-patched model has an entropy model to draft with")
    model = make_model(name)
    for k in ks:
        stats = SpeculationStats()
        out = generate(model, [SHORT, LONG], n, stop_at_eos=False, speculate=k, draft=draft, stats=stats)
        assert out == plain(name, n=n)
        assert stats.drafted == k * (stats.passes - 2)  # every pass after the prefill verified k drafts per row
        assert stats.produced == stats.passes + stats.accepted
        assert stats.accepted > 0 or draft == "entropy"  # a random entropy model seldom agrees with the BLT


@pytest.mark.parametrize("draft", ["self", "entropy"])
@pytest.mark.parametrize("name", list(PATCHERS))
def test_greedy_speculation_is_plain_decoding(name, draft):
    check_greedy(name, draft, (4,), 128)


@pytest.mark.slow
@pytest.mark.parametrize("draft", ["self", "entropy"])
@pytest.mark.parametrize("name", list(PATCHERS))
def test_greedy_speculation_is_plain_decoding_512_bytes(name, draft):
    check_greedy(name, draft, (2, 4, 8), 512)


def test_speculation_on_a_compiled_engine_is_plain_decoding():
    # speculation's passes run eagerly; a compiled engine's global cache only grows between steps (`reserve`),
    # which its kept bytes' writes must respect too
    model = make_model("entropy-global")
    for k in (2, 8):
        out = generate(model, [SHORT, LONG], 256, stop_at_eos=False, speculate=k, compile=True)
        assert out == plain("entropy-global", n=256)


@pytest.mark.parametrize("draft", ["self", "entropy"])
def test_chunks_longer_than_the_window(draft):
    """k + 1 bytes per pass with a 4-byte local window: the ring buffers keep only the last 4 kept positions."""
    model = make_model("entropy-global", window=4)
    out = generate(model, [SHORT, LONG], 128, stop_at_eos=False, speculate=8, draft=draft)
    assert out == plain("entropy-global", window=4, n=128)


@pytest.mark.parametrize("name", list(PATCHERS))
def test_speculation_equals_recompute(name):
    model = make_model(name)
    out, logits = generate(model, [LONG], 48, stop_at_eos=False, speculate=4, return_logits=True)
    ref, ref_logits = generate_recompute(model, [LONG], 48, stop_at_eos=False, return_logits=True)
    assert out == ref
    assert logits[0].shape == ref_logits[0].shape
    assert (logits[0] - ref_logits[0]).abs().max() < 1e-4


@pytest.mark.parametrize("sampling", [{}, dict(temperature=0.8, top_k=50, seed=7)])
def test_batch_rows_get_what_they_get_alone(sampling):
    model = make_model("entropy-global")
    prompts = [LONG, "", SHORT, b"\xff\xfe bytes"]
    together = model.generate(prompts, 96, speculate=4, **sampling)
    alone = [model.generate([p], 96, speculate=4, **sampling)[0] for p in prompts]
    assert together == alone
    if not sampling:
        assert together == model.generate(prompts, 96)


def test_seeded_speculative_sampling_reproduces():
    model = make_model("space")
    a = model.generate([LONG], 128, temperature=1.0, top_p=0.9, seed=3, speculate=4)
    assert a == model.generate([LONG], 128, temperature=1.0, top_p=0.9, seed=3, speculate=4)
    assert a != model.generate([LONG], 128, temperature=1.0, top_p=0.9, seed=4, speculate=4)
    b = model.generate([LONG], 128, temperature=1.0, seed=3, speculate=4, draft="self")
    assert b == model.generate([LONG], 128, temperature=1.0, seed=3, speculate=4, draft="self")


def chi_square_p(a: torch.Tensor, b: torch.Tensor) -> float:
    """p-value of the chi-square test that two count vectors come from one distribution (categories seen
    fewer than 10 times in all pooled into one)."""
    total = a + b
    rare = total < 10
    a = torch.cat([a[~rare], a[rare].sum(0, keepdim=True)]).double()
    b = torch.cat([b[~rare], b[rare].sum(0, keepdim=True)]).double()
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    share = (a + b) / (a.sum() + b.sum())
    expected_a, expected_b = share * a.sum(), share * b.sum()
    stat = ((a - expected_a) ** 2 / expected_a + (b - expected_b) ** 2 / expected_b).sum()
    dof = len(a) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.double), stat / 2)) if dof else 1.0


def byte_counts(samples: list[bytes], n: int) -> torch.Tensor:
    """[n, 256]: how often each byte value appears at each of the first n positions."""
    counts = torch.zeros(n, 256, dtype=torch.long)
    for s in samples:
        for i, byte in enumerate(s[:n]):
            counts[i, byte] += 1
    return counts


@pytest.mark.parametrize(
    "name, draft", [("static", "self"), pytest.param("entropy-global", "self", marks=pytest.mark.slow)]
)
def test_speculative_sampling_has_plain_samplings_distribution(name, draft):
    """2,000 samples of 8 bytes each way (the global RNG, seeded: rows sample independently); every position's
    byte distribution agrees (chi-square, p > 0.001 at each of 8 positions); a temperature of 0.9 instead of 1
    is told apart (p < 1e-4), so the test can see a difference of that size."""
    model, prompts, n = make_model(name), [LONG] * 2000, 8
    torch.manual_seed(1)
    ref = byte_counts(generate(model, prompts, n, temperature=1.0, stop_at_eos=False), n)
    torch.manual_seed(2)
    stats = SpeculationStats()
    spec = byte_counts(
        generate(model, prompts, n, temperature=1.0, stop_at_eos=False, speculate=4, draft=draft, stats=stats), n
    )
    assert 0.2 < stats.acceptance_rate < 0.95  # drafts both kept and refused: the rule is at work
    p_values = [chi_square_p(ref[i], spec[i]) for i in range(n)]
    assert min(p_values) > 1e-3, p_values
    torch.manual_seed(3)
    colder = byte_counts(generate(model, prompts, n, temperature=0.9, stop_at_eos=False), n)
    assert min(chi_square_p(ref[i], colder[i]) for i in range(1, n)) < 1e-4


@pytest.mark.parametrize("name", ["entropy-global", "entropy-max-length", "static", "bpe", "space-max-length"])
def test_extend_then_accept_is_stepping_the_kept_bytes(name):
    """Rows keep 0, 3 and all 9 bytes of a chunk whose bytes close several patches; the logits of the chunk and
    of 24 more steps match those of engines that stepped the kept bytes one at a time."""
    model = make_model(name)
    prompts = [model.encode(p) for p in (LONG, SHORT, TEXT[:40])]
    chunk = model.encode(" the epoch of belief, it was", bos=False)[:9].repeat(3, 1)  # [3, 9]
    after = model.encode("worst of times; the age of wisdom", bos=False)[:24]
    keep = torch.tensor([0, 3, 9])

    engine = SpeculativeBLT(model)
    engine.prefill(prompts)
    chunk_logits = engine.extend(chunk)
    assert int(engine.pending.opens[2].sum()) >= 2  # the chunk closes several patches
    engine.accept(keep)
    continued = torch.stack([engine.step(after[i].repeat(3)) for i in range(len(after))], 1)  # [3, 24, V]

    for b, prompt in enumerate(prompts):
        alone = IncrementalBLT(model)
        alone.prefill([prompt])
        stepped = [alone.step(chunk[b, i : i + 1])[0] for i in range(int(keep[b]))]
        if stepped:
            torch.testing.assert_close(chunk_logits[b, : int(keep[b])], torch.stack(stepped), rtol=1e-5, atol=1e-5)
        steps = torch.stack([alone.step(after[i : i + 1])[0] for i in range(len(after))])
        torch.testing.assert_close(continued[b], steps, rtol=1e-5, atol=1e-5)
        assert int(engine.state.n_patches[b]) == int(alone.state.n_patches[0])
        assert int(engine.state.open_len[b]) == int(alone.state.open_len[0])


def test_extend_leaves_the_state_alone():
    model = make_model("entropy-global")
    engine = SpeculativeBLT(model)
    engine.prefill([model.encode(LONG)])
    reference = IncrementalBLT(model)
    reference.prefill([model.encode(LONG)])
    engine.extend(model.encode("abcdefgh", bos=False)[None])
    engine.accept(torch.tensor([0]))
    nxt = model.encode("x", bos=False)
    torch.testing.assert_close(engine.step(nxt), reference.step(nxt), rtol=0, atol=1e-6)


def test_generate_command_with_speculation(tmp_path, capsysbinary):
    from blt.cli import main

    model = make_model("entropy-global")
    model.save_pretrained(tmp_path / "m")
    base = ["generate", "--model", str(tmp_path / "m"), "--max-new-bytes", "40", "--raw", LONG]
    assert main(base) == 0
    plain_out = capsysbinary.readouterr()
    assert plain_out.out == model.generate([LONG], 40)[0] and b"speculation" not in plain_out.err
    for draft in ("self", "entropy"):
        assert main(base + ["--speculate", "3", "--draft", draft]) == 0
        out = capsysbinary.readouterr()
        assert out.out == plain_out.out
        line = out.err.decode().strip().splitlines()[-1]
        assert line.startswith("speculation: ") and "bytes per full-model pass" in line
