"""Package structure: no import circle between flashsae's subpackages, and `import flashsae` stays
light (the trainer and the evaluation load on first use)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import flashsae

PACKAGE_ROOT = Path(flashsae.__file__).resolve().parent


def _unit(module: str) -> str | None:
    """The top-level piece of flashsae a dotted module name belongs to ('flashsae.io.api' -> 'io')."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "flashsae" else None


def _imported_modules(path: Path) -> list[tuple[str, int]]:
    """Every flashsae module `path` imports, anywhere in the file (function bodies included), with
    its line: an import inside a function is still a dependency."""
    relative = path.relative_to(PACKAGE_ROOT.parent).with_suffix("")
    parts = list(relative.parts)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if node.module:
                found.append((module, node.lineno))
            else:  # from . import x, y: each name is a module of that package
                found += [(f"{module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _dependency_graph() -> dict[str, dict[str, list[str]]]:
    """{unit: {imported unit: ["file:line", ...]}} over every module below flashsae/ (the root
    __init__ is the facade that re-exports everything, so it is left out)."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        if path == PACKAGE_ROOT / "__init__.py":
            continue
        source = _unit(".".join(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts))
        for module, line in _imported_modules(path):
            target = _unit(module)
            if source and target and target != source:
                graph[source][target].append(f"{path.relative_to(PACKAGE_ROOT)}:{line}")
    return graph


def _find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for child in sorted(graph.get(node, {})):
            if state.get(child) == 1:
                return [*path[path.index(child) :], child]
            if child not in state:
                cycle = visit(child)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_walker_sees_relative_and_local_imports():
    graph = _dependency_graph()
    assert "registry" in graph["io"], "io/ reads architectures from flashsae.registry"
    assert {"io", "ops", "registry"} <= set(graph["modules"])
    assert _find_cycle({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b": []}, "b": {}, "c": {"a": []}}) is None


def test_no_import_cycle_between_subpackages():
    graph = _dependency_graph()
    cycle = _find_cycle(graph)
    if cycle:
        where = {f"{a} -> {b}": graph[a][b] for a, b in zip(cycle, cycle[1:], strict=False)}
        raise AssertionError(f"import cycle {' -> '.join(cycle)}: {json.dumps(where, indent=1)}")


def _modules_after(statement: str) -> set[str]:
    script = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_import_flashsae_leaves_training_and_evaluation_unloaded():
    loaded = _modules_after("import flashsae")
    assert "flashsae.modules" in loaded and "flashsae.io" in loaded
    heavy = sorted(m for m in loaded if m.split(".")[:2] in (["flashsae", "train"], ["flashsae", "eval"]))
    assert heavy == [], f"import flashsae loaded {heavy}"


def test_lazy_subpackages_load_on_first_use():
    loaded = _modules_after("import flashsae; flashsae.eval.evaluate")
    assert {"flashsae.eval", "flashsae.train"} <= loaded
    assert "eval" in dir(flashsae) and "train" in flashsae.__all__
