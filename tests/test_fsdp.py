"""FSDP2 under torchrun on CPU (gloo, 2 ranks): the loss curve of one process, half the state per rank, sharded
checkpoints that resume at another world size, survive a killed write and export to a loadable model."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import blt
import blt.training.checkpoints
from blt.cli import EXIT_USER_ERROR, main
from blt.training.checkpoints import latest_checkpoint, load_weights, usable_checkpoint
from blt.training.data import Document, PackedSequences, build_stream
from blt.training.distributed import Dist
from blt.training.loop import TrainConfig, lm_loss, train_loop
from tests.helpers import TEXT, tiny_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
# warmup longer than the run: the learning rate of steps 1..6 does not depend on --max-steps, so a run stopped at
# step 4 and resumed to 6 follows the uninterrupted one
ARGS = "train --preset tiny --patching space --seq-len 128 --batch-size 4 --grad-accum 2 --warmup-steps 10 "
ARGS += "--log-every 1 --eval-every 3 --ckpt-every 4 --device cpu --parallel fsdp"


def blt_cli(tmp, out, *extra, ranks=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks > 1 else []
    cmd = [sys.executable, *launcher, "-m", "blt.cli", *ARGS.split(), "--data", "corpus.txt", "--out", str(out)]
    run = subprocess.run(cmd + [str(a) for a in extra], capture_output=True, text=True, env=ENV, cwd=tmp)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def records(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def losses(out):
    return np.array([r["loss"] for r in records(out)])


def cut_at_step_4(src, dst):
    """A copy of run `src` as if it had stopped at its step-4 checkpoint."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "step-00000006")
    (dst / "checkpoints" / "latest").write_text("step-00000004\n")
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Six steps of the tiny preset: one process (sharded checkpoints of 1 rank), and 2 FSDP ranks."""
    tmp = tmp_path_factory.mktemp("fsdp")
    (tmp / "corpus.txt").write_text("\n\n".join(f"{i}: {TEXT}" for i in range(20)))
    blt_cli(tmp, tmp / "one", "--max-steps", 6)
    blt_cli(tmp, tmp / "two", "--max-steps", 6, ranks=2)
    return tmp


def test_two_fsdp_ranks_match_one_process(runs):
    one, two = runs / "one", runs / "two"
    assert len(losses(one)) == len(losses(two)) == 6
    assert np.abs(losses(one) - losses(two)).max() < 1e-5
    a, b = blt.load_pretrained(one), blt.load_pretrained(two)  # the final model, gathered from the shards
    for (name, wa), wb in zip(a.state_dict().items(), b.state_dict().values()):
        assert (wa - wb).abs().max() < 1e-5, name
    shards = sorted(p.name for p in (two / "checkpoints" / "step-00000004" / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own


def test_activation_checkpointing_gives_the_same_losses(runs):
    blt_cli(runs, runs / "ac", "--max-steps", 6, "--activation-checkpointing", ranks=2)
    assert np.abs(losses(runs / "ac") - losses(runs / "one")).max() < 1e-5


def test_bf16_on_two_cpu_ranks_follows_the_float32_curve(runs):
    """--precision bf16 under FSDP on CPU ranks: the units gather bfloat16 weights and reduce float32 gradients; the
    losses stay within bfloat16's rounding of the float32 run's, and the saved weights are float32."""
    blt_cli(runs, runs / "bf16", "--max-steps", 6, "--precision", "bf16", ranks=2)
    bf16, fp32 = losses(runs / "bf16"), losses(runs / "two")
    assert len(bf16) == 6 and np.abs(bf16 - fp32).max() < 2e-2 * fp32.max()
    assert not np.array_equal(bf16, fp32)  # the mixed-precision policy took effect
    assert all(t.dtype == torch.float32 for t in blt.load_pretrained(runs / "bf16").state_dict().values())


@pytest.mark.slow
def test_compiled_checkpointed_blocks_give_the_same_losses(runs):
    """--compile with --activation-checkpointing on 2 ranks (about a minute of compiling on 2 CPU cores)."""
    blt_cli(runs, runs / "compiled", "--max-steps", 6, "--compile", "--activation-checkpointing", ranks=2)
    assert np.abs(losses(runs / "compiled") - losses(runs / "one")).max() < 1e-5


def test_fsdp_halves_the_state_per_rank(runs, capsys):
    """Rank 0's parameters and AdamW moments, measured from its local shards after the first step: half of what
    one process (and every DDP rank: test_distributed) holds, and what `blt memory` says."""
    whole, half = records(runs / "one")[0], records(runs / "two")[0]
    assert half["param_bytes"] / whole["param_bytes"] == pytest.approx(0.5, abs=0.02)
    assert half["optimizer_bytes"] / whole["optimizer_bytes"] == pytest.approx(0.5, abs=0.02)
    assert main(["memory", "--preset", "tiny", "--world-size", "2", "--fp32", "--json"]) == 0
    estimate = json.loads(capsys.readouterr().out)
    assert estimate["params"] == blt.load_pretrained(runs / "one").num_params()
    assert estimate["ddp"]["parameters"] == whole["param_bytes"]
    assert estimate["fsdp"]["parameters"] == half["param_bytes"]
    assert estimate["fsdp"]["optimizer"] == pytest.approx(half["optimizer_bytes"], rel=0.01)  # + AdamW's step counts


def test_two_ranks_resume_on_one(runs):
    out = cut_at_step_4(runs / "two", runs / "two-then-one")
    blt_cli(runs, out, "--max-steps", 6, "--resume")
    assert len(losses(out)) == 6
    assert np.abs(losses(out) - losses(runs / "one")).max() < 1e-5


def test_one_rank_resumes_on_two(runs):
    out = cut_at_step_4(runs / "one", runs / "one-then-two")
    blt_cli(runs, out, "--max-steps", 6, "--resume", ranks=2)
    assert len(losses(out)) == 6
    assert np.abs(losses(out) - losses(runs / "one")).max() < 1e-5


def test_export_of_two_ranks_shards_gives_the_trained_logits(runs, capsys):
    """The step-6 checkpoint, written as 2 shards, exported in one process: the logits of the model the run
    gathered from its ranks at the end of training."""
    assert main(["export", str(runs / "two" / "checkpoints" / "step-00000006"), str(runs / "exported")]) == 0
    assert "wrote" in capsys.readouterr().out
    exported, trained = blt.load_pretrained(runs / "exported"), blt.load_pretrained(runs / "two")
    ids = blt.encode(TEXT)[None]
    assert torch.equal(exported(ids), trained(ids))
    # a run folder exports its newest checkpoint; a folder that is neither is one line
    assert main(["export", str(runs / "two"), str(runs / "exported-run")]) == 0
    assert torch.equal(blt.load_pretrained(runs / "exported-run")(ids), trained(ids))
    assert main(["export", str(runs / "corpus.txt"), str(runs / "nothing")]) == EXIT_USER_ERROR
    assert "neither a run folder" in capsys.readouterr().err


# ---- in one process: `--parallel fsdp` trains the model whole and writes sharded checkpoints -----------------
CFG = TrainConfig(
    seq_len=64, batch_size=4, lr=3e-3, warmup_steps=2, max_steps=6, ckpt_every=2, log_every=1, parallel="fsdp"
)


def job(seed=0):
    torch.manual_seed(seed)
    model = blt.BLT(tiny_config())
    data = PackedSequences(build_stream([Document("a", (TEXT * 6).encode())]), 64)
    return model, data, lambda m, batch: lm_loss(m(batch["ids"]), batch["targets"])


@pytest.fixture
def one_thread():
    """The in-process runs are tiny: one thread, not two that wait on each other on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Killed(BaseException):
    """The process dying: nothing after it runs, no cleanup."""


def test_killed_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch, one_thread):
    reference, data, forward = job()
    train_loop(reference, data, CFG, tmp_path / "straight", forward, progress=False)

    real_save, calls = blt.training.checkpoints.dcp.save, []

    def dies_mid_write(state, storage_writer, **kwargs):
        calls.append(1)
        real_save(state, storage_writer=storage_writer, **kwargs)
        if len(calls) == 2:  # step 4: the shards are on disk, half of one is lost, nothing else happens
            shard = next(Path(storage_writer.path).glob("*.distcp"))
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
            raise Killed

    monkeypatch.setattr(blt.training.checkpoints.dcp, "save", dies_mid_write)
    model, data, forward = job()
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train_loop(model, data, CFG, out, forward, progress=False)
    monkeypatch.undo()
    assert (out / "checkpoints" / ".tmp-step-00000004").is_dir()  # what the kill left
    assert latest_checkpoint(out).name == usable_checkpoint(out).name == "step-00000002"

    resumed, data, forward = job(seed=123)  # a different init: everything comes from the checkpoint
    train_loop(resumed, data, CFG, out, forward, resume=True, progress=False)
    assert len(losses(out)) == 6
    assert np.abs(losses(out) - losses(tmp_path / "straight")).max() < 1e-5
    # the checkpoint the resumed run wrote holds the weights it trained: loaded into a fresh model, same logits
    fresh, _, _ = job(seed=7)
    load_weights(latest_checkpoint(out), fresh)
    ids = blt.encode(TEXT[:100])[None]
    assert torch.equal(fresh.eval()(ids), resumed.eval()(ids))


def test_parallel_mistakes_are_one_line(tmp_path, capsys):
    model, data, forward = job()
    with pytest.raises(blt.BltError, match="--parallel none trains in one process, but torchrun started 2"):
        train_loop(model, data, TrainConfig(parallel="none"), tmp_path, forward, d=Dist(0, 2), progress=False)
    with pytest.raises(blt.BltError, match="parallel must be one of none, ddp, fsdp"):
        TrainConfig(parallel="zero3")
    with pytest.raises(SystemExit) as refused:
        main(["train", "--data", "x", "--out", str(tmp_path / "o"), "--parallel", "zero3"])
    assert refused.value.code == EXIT_USER_ERROR
    assert "invalid choice: 'zero3'" in capsys.readouterr().err
