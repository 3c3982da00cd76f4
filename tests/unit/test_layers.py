"""The package's imports point one way: gateway -> models -> supervisor -> interfaces, with no cycles.

Each module of ``llamad`` has a layer; a module may import modules of its own
layer or of lower ones, never a higher one, and the imports form no cycle.
Imports under ``if TYPE_CHECKING:`` are annotations, not dependencies, and are
not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "llamad"

# Highest first.  A module not listed by name is placed by its longest listed prefix.
LAYERS: dict[str, int] = {
    "llamad.tap": 6, "llamad.root": 6, "llamad.cli": 6,                  # wiring, the root service, the console
    "llamad.gateway": 5, "llamad.health": 5, "llamad.k8s": 5,            # the sites and the poller
    "llamad.fleet": 4,                                                   # models: fleet, runtime, gate, placement
    "llamad.keys": 3,                                                    # API keys and their policy
    "llamad.supervisor": 2, "llamad.backends": 2, "llamad.runfiles": 2,  # the child
    "llamad.status": 2, "llamad.activity": 2, "llamad.metrics": 2, "llamad.kv": 2,
    "llamad.interfaces": 1, "llamad.config": 1, "llamad.errors": 1,      # contracts and plain values
    "llamad.logs": 1, "llamad.notify": 1, "llamad.timers": 1, "llamad.demo": 1, "llamad": 1,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    name = module
    while name not in LAYERS:
        name = name.rpartition(".")[0]
        assert name, f"{module} has no layer: add it to LAYERS"
    return LAYERS[name]


def imports(module: str) -> set[str]:
    """The llamad modules ``module`` imports at run time (anywhere in the file, not under TYPE_CHECKING)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                if child.module == "llamad" or child.module.startswith("llamad."):
                    for alias in child.names:
                        full = f"{child.module}.{alias.name}"
                        found.add(full if full in MODULES else child.module)
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("llamad"))
            visit(child)

    visit(ast.parse(MODULES[module].read_text()))
    return {m for m in found if m in MODULES and m != module}


GRAPH = {module: imports(module) for module in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    upward = sorted(m for m in GRAPH[module] if layer(m) > layer(module))
    assert upward == [], f"{module} (layer {layer(module)}) imports a higher layer: {upward}"


def test_no_import_cycles() -> None:
    cycles = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def walk(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                walk(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            walk(module)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer(module)
