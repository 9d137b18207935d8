"""The training loop: exact resume, atomic checkpoints, and clear errors from the command line."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import blt
import blt.training.checkpoints
from blt.cli import EXIT_INTERRUPTED, EXIT_USER_ERROR, main
from blt.config import PatchingConfig
from blt.model.transformer import RMSNorm, sdpa
from blt.training.checkpoints import latest_checkpoint
from blt.training.data import Document, PackedSequences, build_stream, stream_entropies
from blt.training.evaluate import patch_starts_for
from blt.training.loop import Interrupted, TrainConfig, lm_loss, train_loop
from tests.helpers import TEXT, median_threshold, random_entropy_model, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def corpus_file(tmp_path, repeat=6):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"{i}: {TEXT}" for i in range(repeat)))
    return path


def blt_job(seed=0):
    """A tiny BLT with entropy patching and its data, built deterministically."""
    em = random_entropy_model()
    stream = build_stream([Document("a", (TEXT * 6).encode())])
    entropies = stream_entropies(em, stream)
    theta = median_threshold(em, torch.from_numpy(stream[:200].astype(np.int64))[None])
    torch.manual_seed(seed)
    patcher = blt.EntropyPatcher(em, theta)
    model = blt.BLT(tiny_config(patching=PatchingConfig(mode="entropy", threshold=theta)), patcher=patcher)

    def forward(m, batch):
        starts = patch_starts_for(patcher, batch["ids"], batch["entropies"])
        return lm_loss(m(batch["ids"], patch_starts=starts), batch["targets"])

    return model, PackedSequences(stream, 64, entropies), forward


CFG = TrainConfig(
    seq_len=64,
    batch_size=4,
    grad_accum=2,
    lr=3e-3,
    warmup_steps=2,
    max_steps=8,
    ckpt_every=100,
    log_every=1,
    eval_every=1000,
)


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_resume_continues_exactly(tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    reference, data, forward = blt_job()
    train_loop(reference, data, CFG, straight, forward, progress=False)

    model, data, forward = blt_job()
    with pytest.raises(Interrupted, match="interrupted at step 4"):
        train_loop(
            model,
            data,
            CFG,
            broken,
            forward,
            progress=False,
            on_step=lambda s: s == 4 and signal.raise_signal(signal.SIGINT),
        )
    assert latest_checkpoint(broken).name == "step-00000004"
    assert len(losses(broken)) == 4
    resumed, data, forward = blt_job(seed=123)  # a different init: everything must come from the checkpoint
    train_loop(resumed, data, CFG, broken, forward, resume=True, progress=False)

    assert len(losses(broken)) == 8
    assert np.allclose(losses(broken), losses(straight), atol=1e-6, rtol=0)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert (a - b).abs().max() <= 1e-6, name


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    model, data, forward = blt_job()
    cfg = TrainConfig(**{**CFG.__dict__, "ckpt_every": 2, "keep_checkpoints": 5})
    real_save = blt.training.checkpoints.save_file
    calls = {"n": 0}

    def failing_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(blt.training.checkpoints, "save_file", failing_save)
    with pytest.raises(
        blt.BltError, match="No space left on device; the previous checkpoint .*step-00000002 is intact"
    ):
        train_loop(model, data, cfg, tmp_path, forward, progress=False)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-00000002"]  # no half-written directory left behind
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    assert set(load_file(tmp_path / "checkpoints" / "step-00000002" / "model.safetensors")) == {
        k for k in model.state_dict() if not k.startswith("patcher.")
    }


def run_cli(*args, expect):
    code = main([str(a) for a in args])
    assert code == expect
    return code


@pytest.mark.parametrize("case", ["missing", "empty", "no-documents", "too-short", "not-a-model"])
def test_cli_bad_input_is_one_line(tmp_path, capsys, case):
    out = tmp_path / "out"
    if case == "missing":
        args = ["train-entropy", "--data", tmp_path / "nope.txt", "--out", out, "--preset", "tiny"]
        message = "no such file or directory"
    elif case == "empty":
        (tmp_path / "e.txt").write_text("")
        args = ["train-entropy", "--data", tmp_path / "e.txt", "--out", out, "--preset", "tiny"]
        message = "is empty"
    elif case == "no-documents":
        (tmp_path / "d").mkdir()
        args = ["train", "--data", tmp_path / "d", "--out", out, "--preset", "tiny", "--patching", "static"]
        message = "no documents"
    elif case == "too-short":
        (tmp_path / "s.txt").write_text("short text")
        args = ["train", "--data", tmp_path / "s.txt", "--out", out, "--preset", "tiny", "--patching", "space"]
        message = "fewer than one sequence"
    else:
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "notes.txt").write_text("hello")
        args = ["eval", "--model", tmp_path / "m", "--data", corpus_file(tmp_path)]
        message = "is not a model directory"
    run_cli(*args, expect=EXIT_USER_ERROR)
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_refuses_to_overwrite_a_run_and_to_resume_nothing(tmp_path, capsys):
    data = corpus_file(tmp_path)
    common = [
        "train",
        "--data",
        data,
        "--out",
        tmp_path / "r",
        "--preset",
        "tiny",
        "--patching",
        "space",
        "--max-steps",
        "2",
        "--seq-len",
        "64",
    ]
    run_cli(*common[:-4], "--resume", expect=EXIT_USER_ERROR)
    assert "no checkpoint to resume from" in capsys.readouterr().err
    run_cli(*common, expect=0)
    before = (tmp_path / "r" / "model.safetensors").read_bytes()
    run_cli(*common, expect=EXIT_USER_ERROR)
    assert "already holds a training run" in capsys.readouterr().err
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == before  # nothing lost


def test_cli_checkpoint_failure_exits_cleanly(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        blt.training.checkpoints,
        "save_file",
        lambda *a, **k: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission denied")),
    )
    run_cli(
        "train-entropy",
        "--data",
        corpus_file(tmp_path),
        "--out",
        tmp_path / "r",
        "--preset",
        "tiny",
        "--max-steps",
        "3",
        "--seq-len",
        "64",
        expect=EXIT_USER_ERROR,
    )
    err = capsys.readouterr().err
    assert (
        "could not write a checkpoint" in err and "Permission denied" in err and "no earlier checkpoint exists" in err
    )


def test_sigint_then_resume_from_the_command_line(tmp_path):
    """A real `blt train` process, interrupted with SIGINT, then resumed, ends with the same weights
    and losses as an uninterrupted run.

    The processes run single-threaded: with several threads, CPU BLAS may sum in another order in
    another process now and then (a last-bit difference that then grows), which is not what this
    test is about; `test_resume_continues_exactly` covers the multi-threaded loop in one process."""
    data = corpus_file(tmp_path, repeat=30)
    args = [
        "--data",
        str(data),
        "--preset",
        "tiny",
        "--patching",
        "static",
        "--max-steps",
        "60",
        "--seq-len",
        "256",
        "--batch-size",
        "8",
        "--log-every",
        "1",
        "--ckpt-every",
        "1000",
        "--eval-every",
        "1000",
        "--device",
        "cpu",
    ]
    cmd = [sys.executable, "-m", "blt.cli", "train"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        cmd + args + ["--out", str(tmp_path / "straight")], check=True, capture_output=True, env=env, cwd=tmp_path
    )

    proc = subprocess.Popen(
        cmd + args + ["--out", str(tmp_path / "broken")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    metrics = tmp_path / "broken" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err.decode()
    assert b"interrupted at step" in err and b"Traceback" not in err
    assert len(metrics.read_text().splitlines()) < 60, "the run finished before the signal: nothing was tested"
    subprocess.run(
        cmd + args + ["--out", str(tmp_path / "broken"), "--resume"],
        check=True,
        capture_output=True,
        env=env,
        cwd=tmp_path,
    )

    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "broken" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "broken") == losses(tmp_path / "straight")


def test_flops_command_matches_the_hand_count(tmp_path, capsys):
    from tests.helpers import HAND, hand_config

    (tmp_path / "c.json").write_text(json.dumps(hand_config().to_dict()))
    run_cli("flops", "--config", tmp_path / "c.json", "--seq-bytes", 8, "--mean-patch-bytes", 2, "--json", expect=0)
    report = json.loads(capsys.readouterr().out)
    expected = sum(v for k, v in HAND.items() if k != "entropy_model")  # a config file carries no entropy model
    assert report["inference_total"] == pytest.approx(expected) and report["training_total"] == pytest.approx(
        3 * expected
    )


def test_the_blt_command_flushes_subnormals_and_restores_the_default(tmp_path, monkeypatch):
    """Subnormal floats (a slow path on x86 that a trained model's backward pass hits often) are zero while a
    `blt` command runs, and behave as usual again once `main` returns."""
    subnormal = torch.tensor([1e-39])
    assert float(subnormal * 1.0) > 0  # torch's default: kept
    seen = []
    monkeypatch.setattr(blt.cli, "_eval", lambda args: seen.append(float(subnormal * 1.0)))
    assert main(["eval", "--model", str(tmp_path), "--data", str(tmp_path)]) == 0
    if torch.set_flush_denormal(False):  # the CPU can flush (x86 with SSE3); the call keeps the default
        assert seen == [0.0]
    assert float(subnormal * 1.0) > 0


@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16"])
def test_precision_on_a_cpu(tmp_path, precision):
    """On a CPU, `auto` and `fp32` compute in float32; `bf16` runs the forward pass under bfloat16 autocast while
    the weights (and so the optimizer) stay float32, and its first loss is within bfloat16's rounding of float32's."""
    model, data, forward = blt_job()
    seen = []

    def recording(m, batch):
        seen.append(m.local_decoder.output(torch.zeros(1, m.local_decoder.output.in_features)).dtype)
        return forward(m, batch)

    cfg = TrainConfig(**{**CFG.__dict__, "max_steps": 2, "grad_accum": 1, "precision": precision})
    train_loop(model, data, cfg, tmp_path, recording, progress=False)
    assert set(seen) == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    first = losses(tmp_path)[0]
    reference, data, forward = blt_job()
    train_loop(reference, data, replace(cfg, precision="fp32"), tmp_path / "fp32", forward, progress=False)
    assert first == pytest.approx(losses(tmp_path / "fp32")[0], rel=0 if precision != "bf16" else 2e-2)


def test_attention_and_norms_under_cpu_autocast_compute_in_float32():
    """Under a CPU autocast, attention takes float32 (bfloat16 attention's backward is the slower one there) and an
    RMSNorm reads a bfloat16 input in its float32 weight's dtype (torch's fused kernel, no warning)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    norm = RMSNorm(8)
    x = torch.randn(3, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("error")
        out = sdpa(q, k, v, is_causal=True)
        normed = norm(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=0, atol=0)
    assert normed.dtype == torch.float32
    torch.testing.assert_close(normed, torch.nn.RMSNorm(8)(x.float()), rtol=0, atol=0)
