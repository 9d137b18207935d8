"""`blt train` under torchrun: 2 CPU ranks with gloo give the loss curve of one process with the same
global batch, and only rank 0 writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from tests.helpers import TEXT

ROOT = Path(__file__).resolve().parents[1]


def losses(out):
    return [
        r["loss"]
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if "loss" in r and not r.get("final")
    ]


def test_two_ranks_match_one_process(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text("\n\n".join(f"{i}: {TEXT}" for i in range(20)))
    args = [
        "train",
        "--data",
        str(data),
        "--preset",
        "tiny",
        "--patching",
        "space",
        "--max-steps",
        "6",
        "--seq-len",
        "128",
        "--batch-size",
        "8",
        "--grad-accum",
        "2",
        "--log-every",
        "1",
        "--eval-every",
        "3",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "blt.cli", *args, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "blt.cli",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert two.returncode == 0, two.stderr
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    assert np.abs(np.array(a) - np.array(b)).max() < 1e-5
    wa, wb = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4
    # one process wrote: a single metrics line per step
    records = [r for r in map(json.loads, (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in records] == sorted({r["step"] for r in records})
    # DDP replicates: each rank holds the parameters and AdamW moments of one process (FSDP halves them: test_fsdp)
    first = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[0])
    for held in ("param_bytes", "optimizer_bytes"):
        assert records[0][held] == first[held] > 0
