"""Training checkpoints: checkpoints/step-NNNNNNNN/ and a `latest` pointer, written atomically (a temporary
directory, then a rename); the previous checkpoint survives a failed or killed write. Two kinds:

one file   model.safetensors + trainer.pt (optimizer inside), written by rank 0 (single process and DDP)
sharded    sharded/ (torch.distributed.checkpoint: every rank writes its own shards of the model and the
           optimizer, `.metadata` says where each piece lives) + trainer.pt (FSDP). Read back at any world size:
           each rank loads the pieces its own shards cover, so 2 ranks can resume on 1 and the reverse.

Both hold checksums.json, each file's size and SHA-256: resume verifies the newest checkpoint and falls back to
the previous complete one (with a warning) when it is truncated or corrupt. trainer.pt holds the step, the data
position, the scheduler, rank 0's RNG state and the validation record."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import CheckpointException, FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict

from blt.errors import BltError
from blt.training.distributed import Dist, first_error, from_main, gather

SHARDED = "sharded"  # the torch.distributed.checkpoint folder of a sharded checkpoint


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
        state = _trainer_state(step, position, elapsed, scheduler, validation)
        torch.save({**state, "optimizer": optimizer.state_dict()}, tmp / "trainer.pt")
        _seal(tmp, final, {name: _checksum(tmp / name) for name in ("model.safetensors", "trainer.pt")})
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a failed write as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        (root / ".latest.tmp").unlink(missing_ok=True)
        raise BltError(f"could not write a checkpoint in {root}: {_cause(e)}; {_kept(previous)}") from None
    _prune(root, keep)
    return final


def save_sharded_checkpoint(
    out: Path, step: int, model, optimizer, scheduler, position: int, elapsed: float, keep: int, validation, d: Dist
) -> Path:
    """Write sharded checkpoint `step`; every rank must call it. Each rank writes its shards into a temporary
    folder, the ranks checksum the files between them, rank 0 renames the folder into place and moves `latest`.
    A failure on any rank raises on all and leaves the previous checkpoint as it was; so does a kill, which
    leaves only a `.tmp-` folder (removed on the next start)."""
    root = out / "checkpoints"
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    previous = latest_checkpoint(out)

    def stage(work):
        """Run `work` on every rank (no collective inside, but DCP's own); any rank's failure raises on all."""
        error = result = None
        try:
            result = work()
        except (OSError, RuntimeError, CheckpointException) as e:  # DCP raises CheckpointException on every rank
            error = _cause(e)
        error = first_error(error, d)  # also the barrier between stages
        if error is not None:
            if d.main:
                shutil.rmtree(tmp, ignore_errors=True)
                (root / ".latest.tmp").unlink(missing_ok=True)
            raise BltError(f"could not write a checkpoint in {root}: {error}; {_kept(previous)}")
        return result

    def prepare():
        if d.main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()

    def write():
        model_state, optim_state = get_state_dict(model, optimizer)
        with _one_process() as alone:
            dcp.save(
                {"model": model_state, "optimizer": optim_state},
                storage_writer=FileSystemWriter(tmp / SHARDED),
                no_dist=alone,
            )
        if d.main:
            torch.save(_trainer_state(step, position, elapsed, scheduler, validation), tmp / "trainer.pt")

    def checksums():  # the ranks share the hashing
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        return {name: _checksum(tmp / name) for name in files[d.rank :: d.world]}

    def seal(sums: dict):
        if d.main:
            _seal(tmp, final, dict(sorted(sums.items())))

    stage(prepare)
    stage(write)
    sums = {name: check for part in gather(stage(checksums), d) for name, check in part.items()}
    stage(lambda: seal(sums))
    if d.main:
        _prune(root, keep)
    return final


def _trainer_state(step: int, position: int, elapsed: float, scheduler, validation) -> dict:
    return {
        "step": step,
        "position": position,
        "elapsed": elapsed,
        "scheduler": scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],  # this rank's device only
        "validation": validation or {},
    }


def _cause(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e).splitlines()[0] if str(e) else type(e).__name__


def _kept(previous: Path | None) -> str:
    return f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"


def _prune(root: Path, keep: int) -> None:
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _one_process():
    """True without a process group (FSDP's one-process runs, export): DCP then reads and writes everything itself,
    which is the intent, so its warning that it does is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield not dist.is_initialized()


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / SHARDED).is_dir()


def _seal(tmp: Path, final: Path, sums: dict) -> None:
    """Make the complete checkpoint written in `tmp` the folder `final` and the run's `latest`, each by a rename."""
    (tmp / "checksums.json").write_text(json.dumps(sums) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = final.parent / ".latest.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, final.parent / "latest")


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


def resume_checkpoint(out: Path, d: Dist) -> Path | None:
    """The checkpoint a run resumes from: rank 0 verifies and chooses, every rank takes the same one."""
    return from_main(usable_checkpoint(out) if d.main else None, d)


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
    _copy_weights(path, weights, model)
    optimizer.load_state_dict(state["optimizer"])
    _restore_trainer(state, scheduler)
    return state


def load_sharded_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Load sharded checkpoint `path` into a model sharded any way (or not at all); every rank must call it. Each
    rank reads the pieces of the saved shards that its own parameters and optimizer moments cover."""
    try:
        state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
        model_state, optim_state = get_state_dict(model, optimizer)
        with _one_process() as alone:
            dcp.load({"model": model_state, "optimizer": optim_state}, checkpoint_id=path / SHARDED, no_dist=alone)
    except Exception as e:  # torch.load and DCP raise many kinds of errors on a damaged or foreign checkpoint
        raise BltError(f"{path} is damaged and cannot be loaded: {_cause(e)}") from None
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    _restore_trainer(state, scheduler)
    return state


def _restore_trainer(state: dict, scheduler) -> None:
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():  # touching every GPU would open a context on each, per rank
        torch.cuda.set_rng_state(state["rng_cuda"][0])


def load_weights(path: Path, model) -> None:
    """The model weights of checkpoint `path` (either kind) into `model`, whole, in this one process."""
    try:
        if is_sharded_checkpoint(path):
            weights = get_model_state_dict(model)
            with _one_process() as alone:
                dcp.load({"model": weights}, checkpoint_id=path / SHARDED, no_dist=alone)
        else:
            weights = load_file(str(path / "model.safetensors"))
    except Exception as e:  # a damaged file, a checkpoint of another model
        raise BltError(f"{path} cannot be loaded into this model: {_cause(e)}") from None
    _copy_weights(path, weights, model)


def _copy_weights(path: Path, weights: dict[str, torch.Tensor], model) -> None:
    """Checkpoint `path`'s `weights` into `model`, in place; refused unless they are exactly its weights."""
    own = _weights(model)
    if set(weights) != set(own):
        raise BltError(f"{path} does not hold this model's weights")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(weights[k])


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}
