"""The package's shape, checked: imports flow one way through the layers (no cycles, none hidden in
functions) and no function outgrows a screen. Reads the source with the AST; imports nothing."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "taesd"

# Bottom (0) to top. A module may import modules of a lower layer, or of its own layer as long as
# that makes no cycle. The longest matching prefix decides a module's layer.
LAYERS = {
    "taesd.errors": 0, "taesd.version": 0, "taesd.settings": 0, "taesd.extras": 0,
    "taesd.registry": 1,
    "taesd.nn": 2,
    "taesd.io": 3, "taesd.runtime.dtypes": 3, "taesd.value_checks": 3,
    "taesd.runtime.devices": 3, "taesd.runtime.isa": 3,
    "taesd.runtime.executors.base": 3,   # what an executor is: tiling may read it, the model may hold one
    "taesd.tiling": 4,
    "taesd.model": 5,
    "taesd.video.model": 5, "taesd.video.temporal": 5, "taesd.video.runs": 5, "taesd.video.weights": 5,
    "taesd.video.tiling": 5,
    "taesd.video.fast": 7, "taesd.video": 8,
    "taesd.export": 6, "taesd.runtime.winograd": 6, "taesd.runtime.amx": 6, "taesd.runtime.native": 6,
    "taesd.runtime": 7,   # taesd.runtime.executors: cpu, cuda, compile, onnxruntime, plain, resolve
    "taesd.loader": 8, "taesd.options": 8,
    "taesd.integrations": 9,
    "taesd.training": 10, "taesd.evaluation": 10,
    "taesd.cli": 11,
    "taesd": 12,   # the package's __init__ (public API) and __main__
}
MAX_FUNCTION_LINES = 80
LITERAL_ARCHITECTURES = {"taesd.nn.arch"}   # the published layer lists read best written out


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def package_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a taesd module in ``path``, at any depth (functions too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "taesd"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                out.append((node.lineno, f"<relative import level {node.level}>"))
            elif node.module and node.module.split(".")[0] == "taesd":
                # `from taesd.tiling import memory` imports the submodule taesd.tiling.memory
                subs = [f"{node.module}.{a.name}" for a in node.names if is_module(f"{node.module}.{a.name}")]
                out += [(node.lineno, m) for m in subs or [node.module]]
    return out


def graph() -> dict[str, list[tuple[int, str]]]:
    return {module_name(p): package_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def layer_violations(edges: dict[str, list[tuple[int, str]]]) -> list[str]:
    bad = []
    for mod, imports in edges.items():
        for line, target in imports:
            if target.startswith("<"):
                bad.append(f"{mod}:{line} uses a {target[1:-1]}; import taesd.... absolutely")
            elif target == "taesd" and mod != "taesd":
                bad.append(f"{mod}:{line} imports the package facade 'taesd'; import the module itself")
            elif layer_of(target) > layer_of(mod):
                bad.append(f"{mod}:{line} imports {target} from a higher layer "
                           f"({layer_of(target)} > {layer_of(mod)})")
    return bad


def cycles(edges: dict[str, list[tuple[int, str]]]) -> list[list[str]]:
    """Import cycles among package modules (an import of a package counts as its __init__)."""
    adj = {m: sorted({t for _, t in imps if t in edges and t != m}) for m, imps in edges.items()}
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for t in adj[m]:
            if state.get(t) == "open":
                found.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in adj:
        if m not in state:
            visit(m)
    return found


def test_imports_flow_down_the_layers():
    assert layer_violations(graph()) == []


def test_no_import_cycles_even_inside_functions():
    assert cycles(graph()) == []


def test_the_check_catches_a_back_edge_and_a_cycle():
    """A deliberately added back-edge (the old model <-> tiling import) must be reported."""
    edges = graph()
    edges["taesd.tiling.runner"] = edges["taesd.tiling.runner"] + [(1, "taesd.model")]
    assert any("taesd.tiling.runner:1 imports taesd.model" in v for v in layer_violations(edges))
    assert any(c[0] == "taesd.model" or "taesd.tiling.runner" in c for c in cycles(edges))


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: module_name(p))
def test_no_function_outgrows_a_screen(path):
    if module_name(path) in LITERAL_ARCHITECTURES:
        return
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines, line {n.lineno})"
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []
