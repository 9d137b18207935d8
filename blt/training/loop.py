"""The training loop, shared by the entropy model and BLT.

AdamW with the paper's recipe (β = 0.9/0.95, weight decay 0.1 on matrices, linear warmup then cosine
decay to 10% of the peak, gradient clipping at 1.0), gradient accumulation, float32 on CPU and
bfloat16 autocast on CUDA by default (`precision`: `bf16` on a CPU pays where it multiplies bfloat16 in
hardware). On a CPU, flush subnormal floats to zero: once a model has trained a while its backward pass
makes them in numbers, each a slow microcode path on x86 (the demo's steps take 1.5x as long: 417 against 281 ms),
and nothing below 1.2e-38 matters to a gradient step. `torch.set_flush_denormal(True)` reaches only the threads
started after it, so call it before torch's first parallel operation; the `blt` command does.

Under `torchrun` every rank takes its own rows of each global batch (NCCL on GPU, gloo on CPU) and the model
is spread over the ranks as `TrainConfig.parallel` says (`parallel.py`): DDP replicates it, FSDP2 shards it.
Only rank 0 writes, but for the shards of a sharded checkpoint.

A run directory holds:
    run.json            what is being trained (model config, training config, data, patching)
    metrics.jsonl       one JSON object per logged step / validation
    checkpoints/        step-NNNNNNNN/{model.safetensors | sharded/, trainer.pt, checksums.json} and `latest`
    config.json, model.safetensors (+ entropy_model/)   the final model, loadable with load_pretrained
Checkpoints are written atomically (a temporary directory, then a rename) every `ckpt_every` steps and
on SIGINT/SIGTERM; `resume=True` continues exactly where the last one stopped, at any world size when the
checkpoints are sharded.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from blt.errors import BltError
from blt.training.checkpoints import (
    is_sharded_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_sharded_checkpoint,
    resume_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
)
from blt.training.data import PackedSequences, batch_indices
from blt.training.distributed import Dist, any_rank, mean_across_ranks
from blt.training.parallel import (
    PARALLEL,
    check_parallel,
    full_state_dict,
    full_value,
    is_sharded,
    prepare_blocks,
    rank_state_bytes,
    shard,
)

PRECISIONS = ("auto", "bf16", "fp32")


def computes_in_bf16(precision: str, device: torch.device) -> bool:
    """Whether training computes in bfloat16: `auto` does on CUDA, not on a CPU (where it pays only on chips with
    bfloat16 matrix units, see `cpu_has_bf16_units`)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def check_precision(precision) -> None:
    if precision not in PRECISIONS:
        raise BltError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (x86 AMX or AVX512-BF16; read on Linux only)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


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
    patience: int | None = None  # stop after this many validations without a new best (None: never stop early)
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    parallel: str = "ddp"  # none | ddp | fsdp: how torchrun's ranks share the model (parallel.py)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    compile: bool = False  # torch.compile each block's forward
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 (autocast, float32 weights) | fp32

    def __post_init__(self):
        """Refuse degenerate settings (zero steps, zero accumulation, a non-finite learning rate), naming them."""
        positive = (
            "seq_len",
            "batch_size",
            "grad_accum",
            "max_steps",
            "eval_every",
            "eval_windows",
            "ckpt_every",
            "log_every",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BltError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "keep_checkpoints", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise BltError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("lr", "beta1", "beta2", "grad_clip", "min_lr_ratio", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise BltError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.lr == 0:
            raise BltError("lr must be > 0, got 0")
        check_precision(self.precision)
        if self.parallel not in PARALLEL:
            raise BltError(f"parallel must be one of {', '.join(PARALLEL)}, got {self.parallel!r}")
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes) and self.max_minutes > 0):
            raise BltError(f"max_minutes must be a positive number, got {self.max_minutes!r}")

    def lr_at(self, step: int) -> float:
        """Learning-rate multiplier at `step` (0-based): linear warmup, cosine to `min_lr_ratio`."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=False)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def log_metrics(out: Path, record: dict) -> None:
    try:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise BltError(f"could not write {out / 'metrics.jsonl'}: {e.strerror or e}") from None


def _parse(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _truncate_metrics(out: Path, step: int) -> None:
    """Forget what was logged after the checkpoint a run resumes from, and the previous final validation (the
    resumed run logs its own); a damaged log is cut at its last complete line."""
    path = out / "metrics.jsonl"
    if path.exists():
        kept = []
        for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
            record = _parse(line)
            if record is None:
                break  # a torn write: everything after it is suspect
            if record.get("step", 0) <= step and not record.get("final"):
                kept.append(line)
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
    on_best: Callable[[torch.nn.Module, dict, dict], None] | None = None,
) -> dict:
    """Train `model` on `data`; `forward(model, batch)` returns the loss of a batch already on the device.

    With `validate`, the model is validated every `eval_every` steps and at the last step; `on_best(model, record,
    weights)` is called (on rank 0, with the model's weights whole even when it is sharded) whenever validation bpb
    reaches a new low, and `cfg.patience` validations without one stop the run (a checkpoint is written first).

    `model` is sharded in place under `cfg.parallel == "fsdp"`; `full_state_dict(model)` (parallel.py) gathers it."""
    d = d or Dist()
    out = Path(out)
    check_parallel(cfg.parallel, d)
    if cfg.batch_size % d.world:
        raise BltError(f"batch size {cfg.batch_size} is not divisible by the {d.world} ranks")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    sharded_checkpoints = cfg.parallel == "fsdp"  # at any world size: the run can move to another one
    prepare_blocks(model, cfg.activation_checkpointing, cfg.compile)
    if cfg.parallel == "fsdp" and d.world > 1:
        shard(model, d, computes_in_bf16(cfg.precision, d.device))  # before the optimizer: it must hold the shards
    model.to(d.device)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.lr_at)
    step, position, elapsed_before = 0, 0, 0.0
    watch = ValidationWatch(cfg.patience)
    if resume:
        ckpt = resume_checkpoint(out, d)
        if ckpt is None:
            raise BltError(f"{out} holds no checkpoint to resume from")
        if is_sharded_checkpoint(ckpt):
            state = load_sharded_checkpoint(ckpt, model, optimizer, scheduler)
        elif is_sharded(model):
            raise BltError(
                f"{ckpt} is a one-file checkpoint (a --parallel ddp or none run); FSDP resumes from sharded "
                "checkpoints: resume with --parallel ddp"
            )
        else:
            state = load_checkpoint(ckpt, model, optimizer, scheduler)
        step, position, elapsed_before = state["step"], state["position"], state["elapsed"]
        watch.load(state.get("validation") or {})
        if d.main:
            _truncate_metrics(out, step)
    replicated = cfg.parallel == "ddp" and d.world > 1
    ddp = torch.nn.parallel.DistributedDataParallel(model) if replicated else model
    # a sharded model computes in bfloat16 through FSDP's mixed-precision policy, the rest through autocast
    bf16_autocast = computes_in_bf16(cfg.precision, d.device) and not is_sharded(model)
    autocast = (lambda: torch.autocast(d.device.type, dtype=torch.bfloat16)) if bf16_autocast else nullcontext

    stop = {"signal": False}
    handlers = {}
    if _in_main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda *_: stop.__setitem__("signal", True))

    bar = tqdm(
        total=cfg.max_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=not (progress and d.main),
        dynamic_ncols=True,
    )
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
                with nullcontext() if sync or not replicated else ddp.no_sync(), autocast():
                    loss = forward(ddp, batch) / cfg.grad_accum
                loss.backward()
                total += loss.detach().item()
            if not math.isfinite(total):
                kept = latest_checkpoint(out)
                raise BltError(
                    f"the loss is {total} at step {step + 1}; training stopped "
                    f"({f'the last good checkpoint is {kept}' if kept else 'no checkpoint was written'}; "
                    "try a lower --lr)"
                )
            grad_norm = full_value(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            position += rows_per_step
            elapsed = elapsed_before + time.time() - start
            loss_value = mean_across_ranks(total, d)
            last = {
                "step": step,
                "loss": loss_value,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "elapsed": elapsed,
            }
            if step == 1:  # what this rank holds (rank 0's is logged): the whole model, or its shards under FSDP
                last.update(rank_state_bytes(model, optimizer))
            if d.main and (step % cfg.log_every == 0 or step == 1):
                log_metrics(out, last)
            watch.train_loss(loss_value)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", bpb=f"{loss_value / math.log(2):.3f}")
            if on_step is not None:
                on_step(step)
            stalled = False
            if validate is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                val = validate(model)
                improved, warning = watch.validation(step, val["bpb"])
                if d.main:
                    log_metrics(out, {"step": step, **{f"val_{k}": v for k, v in val.items()}})
                    bar.write(f"step {step}: val bpb {val['bpb']:.3f}" + (" (best so far)" if improved else ""))
                    if warning:
                        bar.write(warning)
                if improved and on_best is not None:
                    weights = full_state_dict(model)  # under FSDP every rank takes part in gathering them
                    if d.main:
                        on_best(model, {"step": step, **val}, weights)
                stalled = watch.out_of_patience
            out_of_time = cfg.max_minutes is not None and elapsed > cfg.max_minutes * 60
            interrupted = any_rank(stop["signal"], d)
            if step % cfg.ckpt_every == 0 or interrupted or out_of_time or stalled or step == cfg.max_steps:
                args = (out, step, model, optimizer, scheduler, position, elapsed, cfg.keep_checkpoints, watch.state())
                if sharded_checkpoints:
                    save_sharded_checkpoint(*args, d)
                else:
                    if d.main:
                        save_checkpoint(*args)
                    if d.world > 1:
                        dist.barrier()
            if interrupted:
                raise Interrupted(
                    f"interrupted at step {step}; checkpoint written to {out / 'checkpoints'}; continue with --resume"
                )
            if out_of_time:
                if d.main:
                    bar.write(f"stopping after {elapsed / 60:.1f} minutes (--max-minutes)")
                break
            if stalled:
                if d.main:
                    bar.write(
                        f"stopping early at step {step}: no better validation bpb than {watch.best_bpb:.4f} "
                        f"(step {watch.best_step}) in {cfg.patience} validations (--patience)"
                    )
                break
    finally:
        bar.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return last


class ValidationWatch:
    """What validation says about a run: the best bpb so far (and when), how many validations have passed without
    a new best (for --patience), and whether validation bpb rises while the training loss falls (memorizing)."""

    def __init__(self, patience: int | None):
        self.patience = patience
        self.best_bpb, self.best_step, self.since_best = math.inf, 0, 0
        self.last_val: float | None = None
        self.losses: list[float] = []  # training losses since the last validation
        self.last_loss: float | None = None  # their mean at the last validation
        self.warned = False

    def train_loss(self, loss: float) -> None:
        self.losses.append(loss)

    def validation(self, step: int, bpb: float) -> tuple[bool, str | None]:
        """Record a validation -> (a new best?, a one-line warning or None)."""
        loss = sum(self.losses) / len(self.losses) if self.losses else None
        warning = None
        rising = self.last_val is not None and bpb > self.last_val * 1.002
        falling = loss is not None and self.last_loss is not None and loss < self.last_loss
        if rising and falling and not self.warned:
            self.warned = True
            warning = (
                f"warning: validation bpb rose from {self.last_val:.3f} to {bpb:.3f} at step {step} while the training "
                f"loss fell ({self.last_loss / math.log(2):.3f} -> {loss / math.log(2):.3f} bits): the model is "
                "memorizing its training data; best/ keeps the best validation point, --patience stops early"
            )
        improved = bpb < self.best_bpb
        if improved:
            self.best_bpb, self.best_step, self.since_best = bpb, step, 0
        else:
            self.since_best += 1
        self.last_val, self.last_loss, self.losses = bpb, loss if loss is not None else self.last_loss, []
        return improved, warning

    @property
    def out_of_patience(self) -> bool:
        return self.patience is not None and self.since_best >= self.patience

    def state(self) -> dict:
        return {
            "best_bpb": self.best_bpb,
            "best_step": self.best_step,
            "since_best": self.since_best,
            "last_val": self.last_val,
            "last_loss": self.last_loss,
            "warned": self.warned,
        }

    def load(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
