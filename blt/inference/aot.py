"""Step parts compiled ahead of time: `torch.export`, AOTInductor, and a call of the compiled model's loader.

Under `torch.compile` a call of a small step part costs 40-50 us before any arithmetic: dynamo's frame handling,
gathering every tensor the part reads, AOT autograd's runtime wrapper, the generated wrapper. On a CPU that is
more than a `tiny` model's kernels take. Here a part is exported once per engine signature as a function of
explicit tensors and compiled by AOTInductor; a step then gathers those tensors with one generated expression
and calls the loader, a C++ call of a few microseconds.

What a part reads and writes, as inputs of the exported function, in this order:
    weights     every parameter and buffer of the model and of the patcher's modules that the part uses
    constants   the engine's inference copies (`IncrementalBLT.STEP_CONSTANTS`: fused blocks, hash powers, ...)
    state       every tensor of the decoding state (`DecodingState`, its caches; see `leaves`)
    arguments   the part's own tensor arguments
Weights and constants are gathered once per engine, the state at every call. Tensors the part writes in place
(cache slots, counters) are written in place by the compiled code too; state fields the part rebinds
(`state.history = ...`) come back as extra outputs and are set on the state. The sizes that grow between steps
(`IncrementalBLT.growing_sizes`) are dynamic in the export; everything else is fixed, which the engine signature
holds apart (see `blt.inference.decoding.compiled`).

A compiled part is kept on disk in torch's inductor cache folder, keyed by a hash of the exported program, so a
new process (or a new model of the same shape) exports the part (a second or two) and loads it instead of
compiling it again (20-40 s for the three parts of a small model on 2 cores).
"""

from __future__ import annotations

import copy
import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.fx.experimental._config as fx_config
from torch import nn
from torch._inductor.runtime.cache_dir_utils import cache_dir
from torch.export import Dim

# how many parts this process compiled, and how many it loaded from the disk cache (tests read them)
STATS = {"compiled": 0, "loaded": 0}

LeafPath = tuple[tuple[str, object], ...]  # ("attr", name) / ("item", index) steps from a root object


def leaves(obj, path: LeafPath = ()) -> list[tuple[LeafPath, torch.Tensor]]:
    """(path, tensor) of every tensor under `obj`: through lists, tuples and the attributes of plain objects
    (dataclasses, caches, fused blocks). Modules are skipped (their tensors are weights), and so are the
    attributes a class names `transient` (set and read within one part, such as a cache's pending write)."""
    out: list[tuple[LeafPath, torch.Tensor]] = []
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
    elif isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            out += leaves(x, (*path, ("item", i)))
    elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        skip = getattr(type(obj), "transient", ())
        for name, x in vars(obj).items():
            if name not in skip:
                out += leaves(x, (*path, ("attr", name)))
    return out


def rebuilt(obj, values):
    """A copy of `obj`'s structure (as `leaves` walks it) with its tensors taken in order from `values`."""
    if isinstance(obj, torch.Tensor):
        return next(values)
    if isinstance(obj, (list, tuple)):
        return type(obj)(rebuilt(x, values) for x in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        new = copy.copy(obj)
        skip = getattr(type(obj), "transient", ())
        for name, x in vars(obj).items():
            if name not in skip:
                setattr(new, name, rebuilt(x, values))
        return new
    return obj


def _expr(root: str, path: LeafPath) -> str:
    return root + "".join(f".{key}" if kind == "attr" else f"[{key}]" for kind, key in path)


def _reader(paths: list[LeafPath]) -> Callable:
    """`f(root) -> [tensor at each path]`, as one generated expression (a list of attribute reads costs a tenth
    of walking the structure at every call). The paths are attribute names and indices of our own state."""
    return eval(f"lambda r: [{', '.join(_expr('r', p) for p in paths)}]")  # noqa: S307


def _writer(paths: list[LeafPath]) -> Callable:
    """`f(root, values)` setting the field at each path to the matching value."""
    body = "\n".join(f"    {_expr('r', p)} = v[{i}]" for i, p in enumerate(paths)) or "    pass"
    scope: dict = {}
    exec(f"def write(r, v):\n{body}\n", scope)  # noqa: S102
    return scope["write"]


def weight_slots(engine) -> list[tuple[dict, str]]:
    """(the module's `_parameters` or `_buffers`, name) of every weight the engine's model and patcher hold."""
    slots, seen = [], set()
    for root in [engine.model, *engine.patcher.modules()]:
        for module in root.modules():
            for table in (module._parameters, module._buffers):
                for name, t in table.items():
                    if t is not None and (id(table), name) not in seen:
                        seen.add((id(table), name))
                        slots.append((table, name))
    return slots


class CompiledPart:
    """One step part (`fn(engine, *args)`) of one engine signature, compiled ahead of time; call it as `fn`."""

    def __init__(self, engine, fn: Callable, args: tuple[torch.Tensor, ...]):
        self.fn = fn
        self.slots = weight_slots(engine)
        self.constant_paths = [
            p for name in engine.STEP_CONSTANTS for p, _ in leaves(getattr(engine, name), (("attr", name),))
        ]
        self.state_paths = [p for p, _ in leaves(engine.state)]
        self.read_constants = _reader(self.constant_paths)
        self.rebound: list[LeafPath] = []  # set by the trace (`_traced`)
        self.n_results, self.result_kind = 0, "none"

        flat = self._all_inputs(engine, args)
        state_memory = [t.untyped_storage().data_ptr() for t in flat[len(self.slots) + len(self.constant_paths) :]]
        state_memory = [p for p in state_memory if p]  # (an empty tensor holds none)
        if len(set(state_memory)) < len(state_memory):  # the compiled code takes what it writes as apart
            raise RuntimeError("two tensors of the decoding state share memory")
        growing = {id(t): dim for t, dim in engine.growing_sizes()}
        dynamic = [{growing[id(t)]: Dim.DYNAMIC} if id(t) in growing else None for t in flat]
        ep = self._export(engine, flat, dynamic, keep=range(len(flat)))
        # inputs the graph never reads are left out (each costs the loader a little at every call); not those with
        # a dynamic size, which the graph may read without reading the tensor
        used = _used_inputs(ep)
        keep = [i for i in range(len(flat)) if used[i] or dynamic[i] is not None]
        if len(keep) < len(flat):
            ep = self._export(engine, flat, dynamic, keep=keep)
        self.loader = _load_or_compile(ep, flat[0].device.type)
        n_fixed, n_state = len(self.slots) + len(self.constant_paths), len(self.state_paths)
        self.fixed_index = [i for i in keep if i < n_fixed]
        self.read_state = _reader([self.state_paths[i - n_fixed] for i in keep if n_fixed <= i < n_fixed + n_state])
        self.arg_index = [i - n_fixed - n_state for i in keep if i >= n_fixed + n_state]
        self.write_state = _writer(self.rebound)

    def _fixed_inputs(self, engine) -> list[torch.Tensor]:
        """The weights and the engine's inference copies: the same at every step of an engine."""
        return [*(table[name] for table, name in self.slots), *self.read_constants(engine)]

    def _all_inputs(self, engine, args) -> list[torch.Tensor]:
        return [*self._fixed_inputs(engine), *_reader(self.state_paths)(engine.state), *args]

    def _export(self, engine, flat, dynamic, keep):
        """`torch.export` of the part as a function of the inputs `keep` names (of `flat`, in order)."""
        part = self

        class Part(nn.Module):
            def forward(self, *given):
                values = list(flat)  # the inputs left out are never read: their real tensors stand in
                for i, t in zip(keep, given):
                    values[i] = t
                return part._traced(engine, values)

        with torch.no_grad(), fx_config.patch(use_duck_shape=False):  # sizes equal at the trace stay apart
            return torch.export.export(
                Part(), tuple(flat[i] for i in keep), dynamic_shapes=(tuple(dynamic[i] for i in keep),), strict=False
            )

    def _traced(self, engine, values):
        """Run the part on `values` put in place of the engine's tensors -> its results and the rebound state."""
        n_w, n_c, n_s = len(self.slots), len(self.constant_paths), len(self.state_paths)
        weights, constants = values[:n_w], iter(values[n_w : n_w + n_c])
        state_in, args = values[n_w + n_c : n_w + n_c + n_s], values[n_w + n_c + n_s :]
        saved_weights = [table[name] for table, name in self.slots]
        saved = {name: getattr(engine, name) for name in (*engine.STEP_CONSTANTS, "state")}
        try:
            for (table, name), t in zip(self.slots, weights):
                table[name] = t
            for name in engine.STEP_CONSTANTS:
                setattr(engine, name, rebuilt(saved[name], constants))
            engine.state = shadow = rebuilt(saved["state"], iter(state_in))
            result = self.fn(engine, *args)
            after = leaves(shadow)
        finally:
            for (table, name), t in zip(self.slots, saved_weights):
                table[name] = t
            for name, x in saved.items():
                setattr(engine, name, x)
        if [p for p, _ in after] != self.state_paths:
            raise RuntimeError("a step part changed the structure of the decoding state")
        rebound = [(p, t) for (p, t), t_in in zip(after, state_in) if t is not t_in]
        self.rebound = [p for p, _ in rebound]
        results = result if isinstance(result, tuple) else (() if result is None else (result,))
        self.n_results = len(results)
        self.result_kind = "tuple" if isinstance(result, tuple) else ("none" if result is None else "one")
        return (*results, *[t for _, t in rebound])

    def __call__(self, engine, *args):
        fixed = engine.compiled_inputs.get(self)
        if fixed is None:  # gathered once per engine
            every = self._fixed_inputs(engine)
            fixed = engine.compiled_inputs[self] = [every[i] for i in self.fixed_index]
        outs = self.loader.run([*fixed, *self.read_state(engine.state), *[args[i] for i in self.arg_index]])
        n = self.n_results
        if self.rebound:
            self.write_state(engine.state, outs[n:])
        if self.result_kind == "tuple":
            return tuple(outs[:n])
        return outs[0] if self.result_kind == "one" else None


def _used_inputs(ep) -> list[bool]:
    """For each user input of an exported program, in order: does its graph read it?"""
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    specs = [s for s in ep.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    return [len(nodes[s.arg.name].users) > 0 for s in specs]


def _cache_key(ep, device_type: str) -> str:
    """A hash of everything the compiled code depends on: torch, the device, the graph, the inputs' sizes, strides
    and dtypes (symbolic where dynamic), and the signature (which inputs are written)."""
    h = hashlib.sha256()
    h.update(f"{torch.__version__} {device_type}\n".encode())
    h.update(ep.graph_module.code.encode())
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            v = node.meta.get("val")
            h.update(f"{node.name} {getattr(v, 'shape', v)} {getattr(v, 'dtype', '')}".encode())
            if isinstance(v, torch.Tensor):
                h.update(str(v.stride()).encode())
    h.update(str(ep.graph_signature).encode())
    h.update(str(ep.range_constraints).encode())
    return h.hexdigest()[:32]


def _load_or_compile(ep, device_type: str):
    """The loader of `ep` compiled by AOTInductor, from the disk cache when it is there."""
    folder = Path(cache_dir()) / "blt-aot"
    path = folder / f"{_cache_key(ep, device_type)}.pt2"
    if path.is_file():
        try:
            loaded = torch._inductor.aoti_load_package(str(path))
            STATS["loaded"] += 1
            return loaded.loader
        except Exception:  # a damaged or foreign file: compile anew over it
            pass
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=folder)
    os.close(fd)
    try:
        with warnings.catch_warnings():  # torch's own deprecation notice, from pickling the program's tree specs
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            torch._inductor.aoti_compile_and_package(ep, package_path=tmp)
        os.replace(tmp, path)  # whole or not at all, for another process reading the cache
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    STATS["compiled"] += 1
    return torch._inductor.aoti_load_package(str(path)).loader
