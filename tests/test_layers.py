"""The package's layering, read from the code: every import of a `blt` module, at module level or inside a
function, points down the layers, and no set of modules imports itself around a cycle."""

import ast
from pathlib import Path

import blt

PACKAGE = Path(blt.__file__).parent

# bottom to top; a module may import from its own layer or the ones below
LAYERS = [
    {"blt.errors", "blt.tokenizer", "blt.config", "blt.bpe", "blt.presets", "blt.flops", "blt.memory", "blt.rundir"},
    {"blt.model"},
    {"blt.inference"},
    {"blt.weights"},
    {"blt.training"},
    {"blt.experiments"},
    {"blt.serve", "blt.lm_eval"},  # integrations with other tools: the server, the evaluation harness
    {"blt.cli", "blt.__main__"},
]
MODEL_MAY_IMPORT = {"blt.errors", "blt.tokenizer", "blt.config", "blt.bpe", "blt.model"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every module of `modules` that `path` imports, wherever the import stands (module level, function,
    class). `from blt.weights import hf` imports the module blt.weights.hf; `from blt.weights import BLT`
    the package blt.weights."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found & modules


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}


def layer_of(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(module == top or module.startswith(top + ".") for top in layer):
            return i
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def test_every_import_points_down():
    upward = []
    for source, targets in graph().items():
        if source == "blt":  # the package's face re-exports from every layer
            continue
        for target in targets:
            if target != "blt" and layer_of(target) > layer_of(source):
                upward.append(f"{source} -> {target}")
    assert not upward, "imports pointing up a layer: " + ", ".join(sorted(upward))


def test_the_model_imports_only_the_shared_ground_and_itself():
    bad = [
        f"{source} -> {target}"
        for source, targets in graph().items()
        if source.startswith("blt.model")
        for target in targets
        if not any(target == m or target.startswith(m + ".") for m in MODEL_MAY_IMPORT)
    ]
    assert not bad, ", ".join(bad)


def test_no_import_cycle():
    edges = graph()
    edges.pop("blt")  # importing a submodule runs blt/__init__ first; its re-exports are not a design cycle
    for targets in edges.values():
        targets.discard("blt")
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_the_checker_sees_function_local_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from blt.inference import generate\n    import blt.weights.load\n")
    modules = {"blt.inference", "blt.inference.generate", "blt.weights.load", "blt.training"}
    assert imports_of(source, modules) == {"blt.inference.generate", "blt.weights.load"}
