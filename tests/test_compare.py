"""The FLOP-matched comparison: sizing, the token baseline's bits per byte, noise, `blt patch`, and a
small end-to-end run."""

import json
import math
import re

import numpy as np
import pytest
import torch

import blt
import blt.experiments.compare
from blt.bpe import token_ids, train_bpe
from blt.cli import main
from blt.config import EntropyModelConfig
from blt.experiments.baselines import token_byte_lengths, token_stream, token_vocab_size
from blt.experiments.compare import MODELS, DataStats, plan, run_compare
from blt.experiments.noise import PERTURBATIONS, perturb
from blt.training.data import Document
from blt.training.evaluate import evaluate_stream
from tests.helpers import TEXT

STATS = DataStats(
    bytes_per_token=2.5,
    bytes_per_patch={"blt-static": 4.0, "blt-space": 5.3, "blt-entropy": 4.5},
    bpe_vocab=1028,
    entropy_flops_per_byte=2e5,
)


@pytest.mark.parametrize("model", MODELS)
def test_sizing_spends_the_budget_and_grows_with_it(model):
    widths = []
    for budget in (3e12, 3e13, 3e14, 3e15):
        p = plan(model, budget, STATS, seq_len=512, batch_size=8)
        assert abs(p.train_flops - budget) / budget < 0.10
        widths.append(p.width)
    assert widths == sorted(widths) and widths[-1] > widths[0]


def test_budget_too_small_names_the_minimum():
    with pytest.raises(
        blt.BltError, match=r"budget 1\.00e\+08 FLOPs is too small for byte: .* at least [0-9.]+e\+\d+ FLOPs"
    ):
        plan("byte", 1e8, STATS, seq_len=512, batch_size=8)


def test_unknown_model_lists_the_valid_ones(tmp_path, capsys):
    assert (
        main(
            [
                "compare",
                "--data",
                str(tmp_path),
                "--budgets",
                "1e12",
                "--models",
                "byte,gpt5",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "unknown model(s) gpt5" in err and "bpe, byte, blt-static, blt-space, blt-entropy" in err


def test_token_baseline_is_scored_per_byte_of_text():
    """A token model with uniform logits pays log2(V) bits per token; divided by the bytes of the text."""
    tok = train_bpe([TEXT * 3], 300)
    text = TEXT.encode()
    stream = token_stream(tok, [Document("t", text)])
    vocab = token_vocab_size(tok)
    model = blt.EntropyModel(
        EntropyModelConfig(vocab_size=vocab, dim=16, n_layers=1, n_heads=2, ffn_dim=32, sliding_window=None)
    )
    with torch.no_grad():
        model.output.weight.zero_()  # uniform over the vocabulary
    result = evaluate_stream(model, stream, seq_len=len(stream), bytes_per_id=token_byte_lengths(tok))
    n_tokens = len(token_ids(tok, text))
    assert n_tokens < len(text)  # tokens are longer than bytes: the division matters
    assert result["n_bytes"] == len(text)
    assert result["bpb"] == pytest.approx(n_tokens * math.log2(vocab) / len(text), rel=1e-5)


def test_perturbations_are_deterministic():
    for kind in PERTURBATIONS:
        a, b = perturb(TEXT, kind, seed=1), perturb(TEXT, kind, seed=1)
        assert a == b and a != TEXT
        assert perturb(TEXT, kind, seed=2) != a
        assert perturb(TEXT, kind, rate=0.0) == TEXT
    assert perturb("the cat sat", "spaced", rate=1.0) == "T H E C A T S A T"
    with pytest.raises(blt.BltError, match="unknown perturbation"):
        perturb(TEXT, "shuffle")


@pytest.fixture
def space_model(tmp_path):
    torch.manual_seed(0)
    from tests.helpers import tiny_config

    model = blt.BLT(tiny_config(patching=blt.PatchingConfig(mode="space")), patcher=blt.SpacePatcher())
    model.save_pretrained(tmp_path / "m")
    return model, tmp_path / "m"


def test_patch_command_marks_exactly_the_patchers_boundaries(space_model, tmp_path, capsys):
    model, path = space_model
    text = "It was the best of times, it was the worst of times."
    assert main(["patch", "--model", str(path), text, "--no-color", "--html", str(tmp_path / "p.html")]) == 0
    shown = capsys.readouterr().out.strip().split("|")
    assert "".join(shown) == text
    lengths = model.patcher.patch_lengths(blt.encode(text))[0].tolist()
    assert [len(p) for p in shown] == lengths[1:]  # the BOS patch is not shown
    html = (tmp_path / "p.html").read_text()
    boxes = re.findall(r'<span class="p" title="patch \d+, (\d+) bytes">', html)
    assert [int(n) for n in boxes] == lengths[1:]


def test_patch_command_shows_invalid_utf8_as_hex(space_model, tmp_path, capsys):
    _, path = space_model
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe then")
    assert main(["patch", "--model", str(path), "--file", str(tmp_path / "bad.txt"), "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "\\xff" in out and "\\xfe" in out and "then" in out
    assert (
        main(["patch", "--model", str(path), "--file", str(tmp_path / "bad.txt"), "--png", str(tmp_path / "x.png")])
        == 2
    )
    assert "no entropy model" in capsys.readouterr().err


def test_compare_end_to_end_and_finished_runs_are_kept(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text((TEXT * 12)[i * 50 :])
    kwargs = dict(seq_len=128, batch_size=2, bpe_vocab=300, entropy_steps=5, progress=False)
    ws_budget = 1e10
    results = run_compare([str(corpus)], [ws_budget], list(MODELS), tmp_path / "out", **kwargs)
    assert [r["model"] for r in results] == list(MODELS)
    for r in results:
        assert (
            abs(r["train_flops"] - ws_budget) / ws_budget < 0.10
            and np.isfinite(r["bpb"])
            and set(r["noise"]) == {"clean", *PERTURBATIONS}
        )
    report = (tmp_path / "out" / "compare.md").read_text()
    assert report.count("| 1.0e+10 |") == 2 * len(MODELS)  # the main table and the noise table
    assert (tmp_path / "out" / "compare-train.png").exists() and (tmp_path / "out" / "compare-inference.png").exists()
    # a second call redoes nothing
    monkeypatch.setattr(
        blt.experiments.compare, "train_loop", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained"))
    )
    again = run_compare([str(corpus)], [ws_budget], list(MODELS), tmp_path / "out", **kwargs)
    assert [json.dumps(r, sort_keys=True) for r in again] == [json.dumps(r, sort_keys=True) for r in results]
