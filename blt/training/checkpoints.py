"""Training checkpoints: checkpoints/step-NNNNNNNN/{model.safetensors, trainer.pt} and a `latest` pointer,
written atomically (a temporary directory, then a rename); the previous checkpoint survives a failed write."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from blt.errors import BltError


def save_checkpoint(
    out: Path, step: int, model, optimizer, scheduler, position: int, elapsed: float, keep: int, validation=None
) -> Path:
    """Write checkpoint `step` atomically; on failure the previous checkpoint stays as it was. `validation` is the
    loop's record of validation so far (best bpb, patience), restored on resume."""
    root = out / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
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
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / ".latest.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / "latest")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise BltError(f"could not write a checkpoint in {root}: {e.strerror or e}; {kept}") from None
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = out / "checkpoints" / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    weights = load_file(str(path / "model.safetensors"))
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
