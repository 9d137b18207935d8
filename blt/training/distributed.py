"""torchrun's environment as a `Dist`, and the few collectives the loop and its checkpoints need. A plain run is
rank 0 of 1."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def mean_across_ranks(value: float, d: Dist) -> float:
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)  # NCCL reduces only device tensors
    dist.all_reduce(t)
    return float(t) / d.world


def any_rank(flag: bool, d: Dist) -> bool:
    if d.world == 1:
        return flag
    t = torch.tensor([int(flag)], device=d.device)
    dist.all_reduce(t)
    return bool(t.item())


def from_main(value, d: Dist):
    """Rank 0's `value` on every rank (any picklable object)."""
    if d.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value, d: Dist) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if d.world == 1:
        return [value]
    out = [None] * d.world
    dist.all_gather_object(out, value)
    return out


def first_error(error: str | None, d: Dist) -> str | None:
    """The first rank's error message, on every rank (None when no rank failed): one rank's failure stops all."""
    return next((e for e in gather(error, d) if e is not None), None)
