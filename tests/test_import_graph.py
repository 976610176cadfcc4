"""The core package's import graph: no circles and a bounded depth, imports inside functions included.

Read from the source with `ast` (nothing is imported), the way `../shared/tools/import_graph.py`
counts: `from .x import y` is an edge to `nemesis.x` (or to the module `nemesis.x.y`), and
`from . import x` an edge to the package itself and to `nemesis.x`.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = "nemesis"
ROOT = Path(__file__).resolve().parents[1]
# Modules on the longest chain, both ends counted (13 before the circles were broken).
MAX_CHAIN = 7  # issue 19: at most 7 modules inside nemesis/


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(root: Path, path: Path, known: set[str]) -> set[str]:
    """The `known` modules that `path` imports anywhere in its body (top level, functions, branches)."""
    name = _module_name(root, path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = [path for path in (root / PACKAGE).rglob("*.py") if "__pycache__" not in path.parts]
    known = {_module_name(root, path) for path in files}
    return {_module_name(root, path): _imports(root, path, known) for path in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest import chain [importer, ..., bottom module] of an acyclic graph."""

    @cache
    def chain(module: str) -> tuple[str, ...]:
        below = max((chain(target) for target in sorted(graph[module])), key=len, default=())
        return (module, *below)

    return list(max((chain(module) for module in sorted(graph)), key=len))


def test_the_core_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle (lazy imports count): " + " -> ".join(cycle)


def test_the_core_package_imports_stack_at_most_max_chain_deep():
    graph = import_graph()
    assert find_cycle(graph) is None
    chain = longest_chain(graph)
    assert len(chain) <= MAX_CHAIN, f"{len(chain)} modules deep (at most {MAX_CHAIN}): " + " -> ".join(chain)


def test_the_graph_sees_lazy_imports_and_circles(tmp_path):
    package = tmp_path / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("def f():\n    from . import high  # lazy, yet a circle\n")
    (package / "high.py").write_text("from .low import f\n")
    graph = import_graph(tmp_path)
    assert graph["nemesis.low"] == {"nemesis", "nemesis.high"} and graph["nemesis.high"] == {"nemesis.low"}
    assert find_cycle(graph) in (
        ["nemesis.high", "nemesis.low", "nemesis.high"],
        ["nemesis.low", "nemesis.high", "nemesis.low"],
    )
    (package / "low.py").write_text("X = 1\n")
    graph = import_graph(tmp_path)
    assert find_cycle(graph) is None and longest_chain(graph) == ["nemesis.high", "nemesis.low"]
