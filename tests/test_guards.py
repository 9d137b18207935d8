"""Guards against memorizing: best/ keeps the best validation point, --patience stops a run that no longer
improves, warnings for a model too large for its corpus and for validation rising while training falls, and
the xz baseline in `blt eval`."""

import json
import lzma

import pytest

import blt
from blt.cli import main
from blt.training.data import Document, PackedSequences, build_stream
from blt.training.loop import TrainConfig, ValidationWatch, train_loop
from blt.training.recipes import BEST, lm_forward, resolve_model_dir, save_best, xz_bpb
from tests.helpers import TEXT, random_entropy_model


def scripted_validation(values):
    """A validation that reports `values` in turn (and the step's weights, to check best/ kept the right ones)."""
    calls = []

    def validate(model):
        calls.append(float(model.output.weight.detach().sum()))
        return {"bpb": values[len(calls) - 1]}

    return validate, calls


def lm_job():
    model = random_entropy_model()
    stream = build_stream([Document("a", (TEXT * 8).encode())])
    return model.train().requires_grad_(True), PackedSequences(stream, 64)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_best_checkpoint_and_patience(tmp_path, capsys):
    """Validation falls, then rises (an overfitting run): best/ holds the weights of the lowest point and
    --patience stops the run two validations after it."""
    model, data = lm_job()
    validate, weights_seen = scripted_validation([3.0, 2.5, 2.7, 2.9, 3.1, 3.3])
    cfg = TrainConfig(
        seq_len=64,
        batch_size=2,
        lr=1e-3,
        warmup_steps=1,
        max_steps=12,
        eval_every=2,
        log_every=1,
        ckpt_every=100,
        patience=2,
    )
    train_loop(model, data, cfg, tmp_path, lm_forward, validate, progress=False, on_best=save_best(tmp_path))
    assert len(weights_seen) == 4  # validations at steps 2, 4, 6, 8; two without a new best after step 4
    assert max(r["step"] for r in metrics(tmp_path)) == 8  # stopped early, not at 12
    assert json.loads((tmp_path / BEST / "best.json").read_text()) == {"step": 4, "val_bpb": 2.5}
    best = blt.load_entropy_model(tmp_path / BEST)
    assert float(best.output.weight.detach().sum()) == pytest.approx(weights_seen[1], abs=1e-6)
    captured = capsys.readouterr()
    assert "stopping early at step 8: no better validation bpb than 2.5000 (step 4)" in captured.out + captured.err


def test_patience_survives_resume(tmp_path):
    """The best point and the count of validations since it live in the checkpoint: a run resumed after an
    interruption stops where an uninterrupted one does."""
    model, data = lm_job()
    validate, _ = scripted_validation([3.0, 2.5, 2.7, 2.9, 3.1])
    cfg = TrainConfig(
        seq_len=64,
        batch_size=2,
        lr=1e-3,
        warmup_steps=1,
        max_steps=6,
        eval_every=2,
        log_every=1,
        ckpt_every=2,
        patience=2,
    )
    train_loop(model, data, cfg, tmp_path, lm_forward, validate, progress=False)  # validations at 2, 4, 6
    longer = TrainConfig(**{**cfg.__dict__, "max_steps": 12})
    model, data = lm_job()
    validate_more, seen = scripted_validation([2.9, 3.1, 3.3])  # continues at step 8
    train_loop(model, data, longer, tmp_path, lm_forward, validate_more, resume=True, progress=False)
    assert len(seen) == 1  # step 8 is the second validation without a new best since step 4
    assert max(r["step"] for r in metrics(tmp_path)) == 8


def test_overfitting_warning(capsys):
    watch = ValidationWatch(patience=None)
    for loss in (2.0, 1.9):
        watch.train_loss(loss)
    assert watch.validation(10, 3.0) == (True, None)
    for loss in (1.5, 1.4):
        watch.train_loss(loss)
    improved, warning = watch.validation(20, 3.2)
    assert not improved and "validation bpb rose from 3.000 to 3.200 at step 20" in warning
    watch.train_loss(1.0)
    assert watch.validation(30, 3.5)[1] is None  # said once


def test_size_warning_on_a_tiny_corpus(tmp_path, capsys):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(TEXT * 4)
    code = main(
        [
            "train-entropy",
            "--data",
            str(corpus),
            "--out",
            str(tmp_path / "e"),
            "--preset",
            "small",
            "--max-steps",
            "1",
            "--seq-len",
            "64",
            "--batch-size",
            "2",
            "--eval-every",
            "1000",
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "warning: the entropy model has 3." in err and "per byte" in err


def test_best_is_used_by_eval_unless_final(tmp_path):
    (tmp_path / BEST).mkdir()
    assert resolve_model_dir(tmp_path) == tmp_path  # no config.json in best/: not a model
    (tmp_path / BEST / "config.json").write_text("{}")
    assert resolve_model_dir(tmp_path) == tmp_path / BEST
    assert resolve_model_dir(tmp_path, final=True) == tmp_path


def test_xz_bpb_is_lzma_preset_9():
    data = (TEXT * 20).encode()
    assert xz_bpb(data) == 8 * len(lzma.compress(data, preset=9)) / len(data)
    assert xz_bpb(data) < 1.0  # repetition compresses


def test_eval_json_reports_xz(tmp_path, capsys):
    random_entropy_model().save_pretrained(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_bytes(TEXT.encode() * 3)
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(text), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    data = TEXT.encode() * 3
    assert report["xz_bpb"] == pytest.approx(8 * len(lzma.compress(data, preset=9)) / len(data))
    assert report["n_bytes"] == len(data)
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(text)]) == 0
    out = capsys.readouterr().out
    assert "xz -9 bits per byte" in out and ("LOSES to xz" in out) == (report["bpb"] > report["xz_bpb"])


def test_eval_context_scores_every_byte_once_with_overlapping_windows(tmp_path, capsys):
    """`--context` (strided windows) scores the same bytes as plain windows; with the tiny entropy model's
    reach (30 bytes) covered, the bpb is that of one window over the whole text."""
    random_entropy_model().save_pretrained(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_bytes(TEXT.encode() * 2)
    reports = []
    for args in (["--seq-len", "64", "--context", "32"], ["--seq-len", "512"], ["--seq-len", "64"]):
        assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(text), "--json", *args]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    strided, whole, plain = reports
    assert strided["n_bytes"] == whole["n_bytes"] == plain["n_bytes"] == len(TEXT.encode() * 2)
    assert strided["context"] == 32 and strided["bpb"] == pytest.approx(whole["bpb"], rel=1e-5)
    assert plain["bpb"] != pytest.approx(whole["bpb"], rel=1e-3)
