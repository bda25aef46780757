"""The import layering docs/layout.md describes: no cycles, and no module imports one above it.

Floors, bottom up: 0 ``errors``, ``config``, ``checks``; 1 the libraries (``data/``, ``models/``,
metrics, losses, schedulers, optim, confusion, class weights, pruning); 2 ``engine/``; 3 the builders
and entry points (``build``, ``train``, ``job``, ``sweep``, ``infer``, ``eval``, ``export``, ``report``,
``python -m segrun.data``...). Every import counts, also one inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers.cli import REPO

BOTTOM = {"segrun", "segrun.errors", "segrun.config", "segrun.checks"}
LIBRARIES = {"segrun.metrics", "segrun.losses", "segrun.schedulers", "segrun.optim", "segrun.confusion",
             "segrun.class_weights", "segrun.pruning"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in (REPO / "segrun").rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _floor(module: str) -> int:
    if module in BOTTOM:
        return 0
    if module.endswith(".__main__"):
        return 3
    if module in LIBRARIES or module.startswith(("segrun.data.", "segrun.models.")) or module in ("segrun.data",
                                                                                                  "segrun.models"):
        return 1
    if module.startswith("segrun.engine"):
        return 2
    return 3


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("segrun"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("segrun"))
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} (floor {_floor(m)}) imports {d} (floor {_floor(d)})"
            for m, deps in sorted(graph.items()) for d in sorted(deps) if _floor(d) > _floor(m) and d != "segrun"]


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    cycles: list[str] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_no_module_imports_one_above_it():
    assert _upward(_graph()) == []


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_checkers_see_a_cycle_and_an_upward_import():
    """Both rules on a hand-made graph, so the tests above cannot pass by seeing nothing."""
    graph = {"segrun.data.a": {"segrun.engine.b"}, "segrun.engine.b": {"segrun.data.a", "segrun.errors"},
             "segrun.errors": set()}
    assert _upward(graph) == ["segrun.data.a (floor 1) imports segrun.engine.b (floor 2)"]
    assert _cycles(graph) == ["segrun.data.a -> segrun.engine.b -> segrun.data.a"]
    real = _graph()
    assert "segrun.engine.checkpointer" in real["segrun.engine.trainer"]
    assert "segrun.data.errors" in real["segrun.data.bad_samples"]  # the data layer's errors sit below both
