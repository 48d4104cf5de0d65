"""No import cycles between first-party modules (issue 13, item 4).

A cycle makes import order matter (a module half-initialised when the other reads it) and ties modules that
should be replaceable alone. The graph is read from the source with ``ast``, so nothing is imported: module-level
and function-level imports both count (a deferred import still couples the two modules), imports under
``if TYPE_CHECKING:`` do not (they never run), and so do ``importlib.import_module`` calls with a constant name
(lazy registries). ``from pkg import name`` points at ``pkg.name`` when that is a module, else at ``pkg`` itself.
"""

from __future__ import annotations

import ast
import functools
from collections import deque
from pathlib import Path

from tests.conftest import REPO

#: Source folders and the package names they install as (pyproject's ``package-dir``).
ROOTS = {"bq_onnx": "bq_onnx", "passes": "bq_onnx.passes", "runtimes": "bq_onnx.runtimes"}


def module_files(repo: Path, roots: dict[str, str]) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` under the roots (subpackages included)."""
    modules = {}
    for folder, package in roots.items():
        base = repo / folder
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_module_name(node: ast.AST) -> str | None:
    """The constant module name of an ``importlib.import_module("...")`` / ``import_module("...")`` call."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    arg = node.args[0]
    if name == "import_module" and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    return None


def _imports(tree: ast.AST):
    """Every import statement or constant ``import_module`` call that runs (anywhere in the module), skipping
    ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)) or _import_module_name(node) is not None:
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The first-party module ``name`` means (its longest known prefix: ``bq_onnx.x.attr`` -> ``bq_onnx.x``)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules:
            return candidate
    return None


def _absolute(module: str, is_package: bool, level: int, name: str) -> str:
    """``name`` imported with ``level`` leading dots from ``module``: one package up per dot after the first."""
    if not level:
        return name
    package = module.split(".") if is_package else module.split(".")[:-1]
    package = package[: len(package) - (level - 1)]
    return ".".join([*package, name] if name else package)


def _targets(node: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """The dotted names one import statement or ``import_module`` call brings in."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = _absolute(module, is_package, node.level, node.module or "")
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    name = _import_module_name(node)  # relative names: relative to the calling module's package
    level = len(name) - len(name.lstrip("."))
    return [_absolute(module, is_package, level, name[level:])]


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported first-party module: line of the first such import}."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        is_package = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            for target in _targets(node, module, is_package, modules):
                found = _resolve(target, modules)
                if found is not None and found != module:
                    edges[found] = min(edges.get(found, node.lineno), node.lineno)
        graph[module] = edges
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's components with more than one module, each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def shortest_cycle(graph: dict[str, dict[str, int]], start: str, inside: set[str]) -> list[str]:
    """The shortest import path from ``start`` back to itself within one component (breadth first)."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v]):
            if w not in inside:
                continue
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if w not in parent:
                parent[w] = v
                queue.append(w)
    return [start]


def describe(graph: dict[str, dict[str, int]], modules: dict[str, Path], repo: Path) -> str:
    """One paragraph per cycle: its modules, one shortest loop, and every import inside it with file:line."""
    lines = []
    for component in strongly_connected(graph):
        inside = set(component)
        loop = shortest_cycle(graph, component[0], inside)
        lines.append(f"cycle of {len(component)} modules: {', '.join(component)}")
        lines.append(f"  e.g. {' -> '.join(loop)}")
        for v in component:
            for w, line in sorted(graph[v].items()):
                if w in inside:
                    lines.append(f"  {modules[v].relative_to(repo)}:{line}  {v} -> {w}")
    return "\n".join(lines)


@functools.cache
def repo_graph() -> tuple[dict[str, Path], dict[str, dict[str, int]]]:
    """The repository's modules and import graph, parsed once for the tests below."""
    modules = module_files(REPO, ROOTS)
    return modules, import_graph(modules)


def test_finder_sees_function_level_relative_and_from_package_imports(tmp_path):
    """The machinery itself: a cycle closed only by a deferred ``from pkg import sub`` and a relative import is
    found; ``TYPE_CHECKING`` imports and attribute imports of the package are told apart."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("VERSION = '1'\n")
    (pkg / "a.py").write_text("from pkg import VERSION\nfrom pkg.sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("def f():\n    from pkg import b\nimport pkg.b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
                              "from .sub.c import f\nimport pkg.a as alias\n")
    (pkg / "d.py").write_text("if TYPE_CHECKING:\n    import pkg.a\nimport importlib\n"
                              "def g():\n    return importlib.import_module('.sub.c', __name__)\n")
    (pkg / "sub" / "e.py").write_text("from importlib import import_module\nimport_module('pkg.b')\n")
    modules = module_files(tmp_path, {"pkg": "pkg"})
    graph = import_graph(modules)
    assert graph["pkg.a"] == {"pkg": 1, "pkg.sub.c": 2}
    assert graph["pkg.sub.c"] == {"pkg.b": 2}
    assert graph["pkg.b"] == {"pkg.sub.c": 4, "pkg.a": 5}
    assert graph["pkg.d"] == {"pkg.sub.c": 5}
    assert graph["pkg.sub.e"] == {"pkg.b": 2}
    assert strongly_connected(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert shortest_cycle(graph, "pkg.b", {"pkg.a", "pkg.b", "pkg.sub.c"}) == ["pkg.b", "pkg.sub.c", "pkg.b"]
    text = describe(graph, modules, tmp_path)
    assert "pkg/b.py:5  pkg.b -> pkg.a" in text and "e.g. pkg.a -> pkg.sub.c -> pkg.b -> pkg.a" in text


def test_every_first_party_module_is_in_the_graph():
    """The roots are the installed packages: a module missed here would hide its cycles."""
    modules, graph = repo_graph()
    assert {"bq_onnx", "bq_onnx.api", "bq_onnx.passes", "bq_onnx.runtimes"} <= set(modules)
    assert any(m.startswith("bq_onnx.passes.") for m in modules)
    assert any(m.startswith("bq_onnx.runtimes.") for m in modules)
    assert sum(len(edges) for edges in graph.values()) > len(modules)  # imports were found, not silently skipped


def test_no_import_cycles_between_first_party_modules():
    modules, graph = repo_graph()
    cycles = strongly_connected(graph)
    assert not cycles, "first-party import cycles:\n" + describe(graph, modules, REPO)
