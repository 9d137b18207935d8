"""Training checkpoints: checkpoints/step-NNNNNNNN/{model.safetensors, trainer.pt, checksums.json} and a
`latest` pointer, written atomically (a temporary directory, then a rename); the previous checkpoint survives a
failed write. `checksums.json` holds each file's size and SHA-256: resume verifies the newest checkpoint and
falls back to the previous complete one (with a warning) when it is truncated or corrupt."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from blt.errors import BltError


def save_checkpoint(
    out: Path, step: int, model, optimizer, scheduler, position: int, elapsed: float, keep: int, validation=None
) -> Path:
    """Write checkpoint `step` atomically; on failure the previous checkpoint stays as it was. `validation` is the
    loop's record of validation so far (best bpb, patience), restored on resume."""
    root = out / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"  # rundir.clean_temporaries removes leftovers on the next start
    previous = latest_checkpoint(out)
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(_weights(model), str(tmp / "model.safetensors"))
        state = {
            "step": step,
            "position": position,
            "elapsed": elapsed,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "validation": validation or {},
        }
        torch.save(state, tmp / "trainer.pt")
        sums = {name: _checksum(tmp / name) for name in ("model.safetensors", "trainer.pt")}
        (tmp / "checksums.json").write_text(json.dumps(sums) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / ".latest.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / "latest")
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a failed write as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        (root / ".latest.tmp").unlink(missing_ok=True)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        cause = getattr(e, "strerror", None) or str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BltError(f"could not write a checkpoint in {root}: {cause}; {kept}") from None
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _checksum(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def verify_checkpoint(path: Path) -> str | None:
    """None when every file of checkpoint `path` has the size and checksum written with it, else the problem."""
    if not (path / "checksums.json").exists() and (path / "trainer.pt").is_file():
        return None  # written before checksums were: nothing to verify against
    try:
        sums = json.loads((path / "checksums.json").read_text())
        for name, want in sums.items():
            if (path / name).stat().st_size != want["bytes"]:
                return f"{name} has {(path / name).stat().st_size} bytes, {want['bytes']} were written"
            if _checksum(path / name)["sha256"] != want["sha256"]:
                return f"{name} does not match its checksum"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable ({e})"
    return None


def usable_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint that verifies; an older one (with a warning on stderr) when the newest does not."""
    root = out / "checkpoints"
    newest = latest_checkpoint(out)
    candidates = sorted(root.glob("step-*"), reverse=True) if root.is_dir() else []
    if newest is not None and newest in candidates:
        candidates.remove(newest)
        candidates.insert(0, newest)
    for path in candidates:
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        print(f"warning: checkpoint {path} is damaged ({problem}); trying the previous one", file=sys.stderr)
    return None


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = out / "checkpoints" / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    try:
        state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
        weights = load_file(str(path / "model.safetensors"))
    except Exception as e:  # torch.load and safetensors raise many kinds of errors on a damaged file
        raise BltError(f"{path} is damaged and cannot be loaded: {str(e).splitlines()[0] if str(e) else e!r}") from None
    own = _weights(model)
    if set(weights) != set(own):
        raise BltError(f"{path} does not hold this model's weights")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(weights[k])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}
