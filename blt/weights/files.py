"""Reading and writing weight files, strictly: errors name the file and the tensor."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from blt.errors import BltError


def rename(name: str, rules) -> str:
    """Apply (pattern, replacement) `rules` to a dot-delimited parameter name, in order."""
    name = "." + name
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name[1:]


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise BltError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BltError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise BltError(f"{path} must hold a JSON object, not {type(obj).__name__}")
    return obj


WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensors(tensors: dict, path: Path) -> dict[str, torch.Tensor]:
    """Refuse what would be silently cast on loading: non-string names, non-tensors, and tensors that are not
    ordinary floats (bool, integer, complex, float8)."""
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise BltError(f"{path}: tensor names must be strings, found {name!r}")
        if not isinstance(t, torch.Tensor):
            raise BltError(f"{path}: {name} is a {type(t).__name__}, not a tensor")
        if t.dtype not in WEIGHT_DTYPES:
            raise BltError(
                f"{path}: tensor {name} has dtype {str(t.dtype).removeprefix('torch.')}; weights must be "
                "float32, float16, bfloat16 or float64"
            )
    return tensors


def check_file_holds(n_params: int, path: Path) -> None:
    """Refuse, before allocating a model, a config that describes more parameters than the weights file can hold
    (2 bytes each at the least): a small file must not make us allocate a huge model."""
    if path.is_file() and n_params * 2 > path.stat().st_size * 1.01 + (1 << 20):
        raise BltError(
            f"{path} holds {path.stat().st_size} bytes but the config describes {n_params:,} parameters "
            f"(>= {2 * n_params:,} bytes): the config does not match the weights"
        )


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BltError(f"{path} is missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise BltError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    return check_tensors(tensors, path)


def read_consolidated(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BltError(f"{path} is missing")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds of errors on a bad file
        raise BltError(f"{path} could not be read as a torch checkpoint (weights_only=True): {e}") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise BltError(f"{path} holds no state dict")
    return check_tensors(state, path)


def fill(module: torch.nn.Module, tensors: dict[str, torch.Tensor], names: dict[str, str], source: Path) -> None:
    """Copy file tensors into `module`, strictly. `names` maps our parameter name -> name in the file."""
    own = module.state_dict()
    missing = [names[k] for k in own if names[k] not in tensors]
    if missing:
        raise BltError(f"{source}: missing tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    used = set(names.values())
    unexpected = [k for k in tensors if k not in used]
    if unexpected:
        listed = ", ".join(sorted(unexpected)[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise BltError(f"{source}: unexpected tensor(s) {listed} (the config does not match the weights)")
    with torch.no_grad():
        for k, target in own.items():
            t = tensors[names[k]]
            if tuple(t.shape) != tuple(target.shape):
                raise BltError(
                    f"{source}: tensor {names[k]} has shape {list(t.shape)}, the config expects {list(target.shape)}"
                )
            target.copy_(t)
