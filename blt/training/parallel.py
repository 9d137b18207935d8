"""How the model is spread over the ranks torchrun started: a wrapper around the model, not a rewrite of it.

none   one process, the model as it is
ddp    DistributedDataParallel: every rank holds the whole model and optimizer, gradients are averaged
       (one process: the model as it is)
fsdp   FSDP2 (`fully_shard`): each rank holds 1/world of every parameter, gradient and optimizer moment;
       a unit's weights are all-gathered just before its forward and backward and freed after. Units:
       every TransformerBlock of every stack and every embedding table (the 1B shape's hash n-gram tables
       hold 3 of its 4.5 billion parameters), each top-level module for what they leave over
       (cross-attention, projections, output), then the root. On CUDA the gathered weights are bfloat16 and
       gradients are reduced in float32; on CPU everything stays float32. One process trains the model as
       it is, and its checkpoints are sharded all the same, so a run moves between world sizes.

Per block, before sharding: `--activation-checkpointing` recomputes the block's activations in backward
instead of keeping them; `--compile` runs the block's forward under torch.compile. Both replace the block's
`forward` on the instance, so parameter names (and checkpoints) do not change.
"""

from __future__ import annotations

import warnings
from functools import partial

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from blt.errors import BltError
from blt.model.transformer import TransformerBlock
from blt.training.distributed import Dist

PARALLEL = ("none", "ddp", "fsdp")


def check_parallel(mode: str, d: Dist) -> None:
    if mode not in PARALLEL:
        raise BltError(f"parallel must be one of {', '.join(PARALLEL)}, got {mode!r}")
    if mode == "none" and d.world > 1:
        raise BltError(f"--parallel none trains in one process, but torchrun started {d.world}; use ddp or fsdp")


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of every stack the model trains (a BLT's patcher is not one of its modules)."""
    return [m for m in model.modules() if isinstance(m, TransformerBlock)]


def prepare_blocks(model: nn.Module, activation_checkpointing: bool = False, compile: bool = False) -> None:
    """Per block: recompute its forward in backward instead of keeping its activations, and compile the whole (the
    checkpointed region inside the compiled graph: compiling inside a checkpoint can recompute another graph)."""
    for block in blocks(model):
        forward = block.forward
        if activation_checkpointing:
            forward = partial(checkpoint, forward, use_reentrant=False)
        if compile:
            forward = torch.compile(forward)
        if forward is not block.forward:
            block.forward = forward


def shard(model: nn.Module, d: Dist, bf16: bool) -> nn.Module:
    """FSDP2 over all ranks, in place: each block and embedding table, the top-level modules with parameters
    left over, the root. Parameters become DTensors holding this rank's rows; names do not change. With `bf16` the
    units compute in bfloat16 and reduce gradients in float32."""
    # FSDP warns that a unit returned a view that an in-place op could detach from its backward hook; no module
    # output is modified in place here (the local encoder's patch vectors are such a view)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(d.device.type, (d.world,))
    if bf16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    in_units = set()
    for unit in [m for m in model.modules() if isinstance(m, (TransformerBlock, nn.Embedding))]:
        fully_shard(unit, mesh=mesh, mp_policy=mp)
        in_units.update(map(id, unit.parameters()))
    for child in model.children():
        if any(id(p) not in in_units for p in child.parameters()):
            fully_shard(child, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights, whole. Under FSDP every rank must call this (the shards are all-gathered, to rank 0's
    CPU memory); rank 0 gets the weights, the other ranks an empty dict."""
    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_value(t: torch.Tensor) -> float:
    """A scalar that may be a DTensor (the gradient norm under FSDP) as a Python float."""
    return float(t.full_tensor() if isinstance(t, DTensor) else t)


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank holds for `t`: its own shard when `t` is a DTensor."""
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def rank_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Parameter and optimizer-state bytes held by this rank (measured from the local shards)."""
    params = sum(local_bytes(p) for p in model.parameters())
    moments = sum(
        local_bytes(v) for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)
    )
    return {"param_bytes": params, "optimizer_bytes": moments}
