"""The training loop, shared by the entropy model and BLT.

AdamW with the paper's recipe (β = 0.9/0.95, weight decay 0.1 on matrices, linear warmup then cosine
decay to 10% of the peak, gradient clipping at 1.0), gradient accumulation, float32 on CPU and
bfloat16 autocast on CUDA. Under `torchrun` the same loop runs DistributedDataParallel (NCCL on GPU,
gloo on CPU): every rank takes its own rows of each global batch, only rank 0 writes.

A run directory holds:
    run.json            what is being trained (model config, training config, data, patching)
    metrics.jsonl       one JSON object per logged step / validation
    checkpoints/        step-NNNNNNNN/{model.safetensors, trainer.pt} and `latest`
    config.json, model.safetensors (+ entropy_model/)   the final model, loadable with load_pretrained
Checkpoints are written atomically (a temporary directory, then a rename) every `ckpt_every` steps and
on SIGINT/SIGTERM; `resume=True` continues exactly where the last one stopped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from blt.data import PackedSequences, batch_indices
from blt.errors import BltError


class Interrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint."""


@dataclass
class TrainConfig:
    seq_len: int = 1024
    batch_size: int = 8  # sequences per optimizer step, summed over ranks, per accumulation step
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    max_steps: int = 1000
    max_minutes: float | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_windows: int = 64
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0

    def lr_at(self, step: int) -> float:
        """Learning-rate multiplier at `step` (0-based): linear warmup, cosine to `min_lr_ratio`."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---- distributed ------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> Dist:
    """Read torchrun's environment; a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world == 1:
        return Dist(device=torch.device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev)


def _mean_across_ranks(value: float, d: Dist) -> float:
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / d.world


def _any_rank(flag: bool, d: Dist) -> bool:
    if d.world == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t)
    return bool(t.item())


# ---- checkpoints --------------------------------------------------------------------------------
def _own_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("patcher.")}


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, position: int, elapsed: float, keep: int) -> Path:
    """Write checkpoint `step` atomically; on failure the previous checkpoint stays as it was."""
    root = out / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    previous = latest_checkpoint(out)
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(_own_state(model), str(tmp / "model.safetensors"))
        state = {
            "step": step, "position": position, "elapsed": elapsed,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
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
    own = _own_state(model)
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


# ---- the loop -------------------------------------------------------------------------------
def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("patcher.")]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=False)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def log_metrics(out: Path, record: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(out: Path, step: int) -> None:
    """Forget what was logged after the checkpoint a run resumes from."""
    path = out / "metrics.jsonl"
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept))


def train_loop(
    model: torch.nn.Module,
    data: PackedSequences,
    cfg: TrainConfig,
    out: Path,
    forward: Callable[[torch.nn.Module, dict], torch.Tensor],
    validate: Callable[[torch.nn.Module], dict] | None = None,
    resume: bool = False,
    d: Dist | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Train `model` on `data`; `forward(model, batch)` returns the loss of a batch already on the device."""
    d = d or Dist()
    out = Path(out)
    if cfg.batch_size % d.world:
        raise BltError(f"batch size {cfg.batch_size} is not divisible by the {d.world} ranks")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model.to(d.device)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.lr_at)
    step, position, elapsed_before = 0, 0, 0.0
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise BltError(f"{out} holds no checkpoint to resume from")
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        step, position, elapsed_before = state["step"], state["position"], state["elapsed"]
        if d.main:
            _truncate_metrics(out, step)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if d.world > 1 else model
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if d.device.type == "cuda" else nullcontext

    stop = {"signal": False}
    handlers = {}
    if _in_main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda *_: stop.__setitem__("signal", True))

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", disable=not (progress and d.main), dynamic_ncols=True)
    start = time.time()
    rows_per_step = cfg.batch_size * cfg.grad_accum
    last = {}
    try:
        model.train()
        while step < cfg.max_steps:
            indices = batch_indices(len(data), cfg.seed, position, rows_per_step)
            total = 0.0
            for micro in range(cfg.grad_accum):
                rows = indices[micro * cfg.batch_size : (micro + 1) * cfg.batch_size][d.rank :: d.world]
                batch = {k: v.to(d.device) for k, v in data.batch(rows).items()}
                sync = micro == cfg.grad_accum - 1 or d.world == 1
                with (nullcontext() if sync else ddp.no_sync()), autocast():
                    loss = forward(ddp, batch) / cfg.grad_accum
                loss.backward()
                total += loss.detach().item()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            position += rows_per_step
            elapsed = elapsed_before + time.time() - start
            loss_value = _mean_across_ranks(total, d)
            last = {"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "elapsed": elapsed}
            if d.main and (step % cfg.log_every == 0 or step == 1):
                log_metrics(out, last)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", bpb=f"{loss_value / math.log(2):.3f}")
            if on_step is not None:
                on_step(step)
            if validate is not None and step % cfg.eval_every == 0 and step < cfg.max_steps:
                val = validate(model)
                if d.main:
                    log_metrics(out, {"step": step, **{f"val_{k}": v for k, v in val.items()}})
                    bar.write(f"step {step}: val bpb {val['bpb']:.3f}")
            out_of_time = cfg.max_minutes is not None and elapsed > cfg.max_minutes * 60
            interrupted = _any_rank(stop["signal"], d)
            if step % cfg.ckpt_every == 0 or interrupted or out_of_time or step == cfg.max_steps:
                if d.main:
                    save_checkpoint(out, step, model, optimizer, scheduler, position, elapsed, cfg.keep_checkpoints)
                if d.world > 1:
                    dist.barrier()
            if interrupted:
                raise Interrupted(f"interrupted at step {step}; checkpoint written to {out / 'checkpoints'}; continue with --resume")
            if out_of_time:
                if d.main:
                    bar.write(f"stopping after {elapsed / 60:.1f} minutes (--max-minutes)")
                break
    finally:
        bar.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return last


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
