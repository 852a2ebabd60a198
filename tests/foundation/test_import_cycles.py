"""No import cycles among megafleet's modules (issue 13 item 6: the cycles
netlang graph <-> model and vm engine <-> spec/api were broken; this keeps them,
and any new one, out).

The scan reads every module's imports that run when the module is imported: the
statements at module level (also inside a module-level `if`, `try`, `with` or
class body), but not those in functions (a deferred import is how a cycle is
broken on purpose) nor those under `if TYPE_CHECKING:` (they never run). An
import of `pkg.mod` is an edge to `pkg.mod` only: Python initialises the parent
package first, before the module, so that implicit import cannot close a
cycle the way an explicit one does. `from pkg import name` is an edge to
`pkg.name` when that is a module, else to `pkg`.
"""

from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Edge:
    """One module-level import: `importer` imports `target` at `file`:`line`."""
    importer: str
    target: str
    file: str
    line: int


def _modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for the package directory `root`."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if all(p.isidentifier() for p in parts):
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
            or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _run_at_import(body: list[ast.stmt]):
    """The statements of `body` that run when the module is imported."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _run_at_import(node.body)
            yield from _run_at_import(node.orelse)
        elif isinstance(node, ast.Try):
            for part in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _run_at_import(part)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from _run_at_import(node.body)


def import_edges(root: Path) -> list[Edge]:
    """Every module-level import from one module of package `root` to another."""
    modules = _modules(root)
    edges = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        for node in _run_at_import(tree.body):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                subs = [f"{base}.{a.name}" for a in node.names]
                targets = [s for s in subs if s in modules]
                if len(targets) < len(subs):
                    targets.append(base)     # a name defined in the package's module itself
            for t in targets:
                if t in modules and t != name:
                    edges.append(Edge(name, t, str(path.relative_to(root.parent)), node.lineno))
    return edges


def find_cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One cycle (as its edges, in order) per strongly connected group of
    modules that import each other (Tarjan's algorithm, then a path around)."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        graph.setdefault(e.importer, {}).setdefault(e.target, e)
        graph.setdefault(e.target, {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        # Recursive: the module graph is a few hundred nodes, far from the limit.
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for group in groups:
        members = set(group)
        # Breadth-first from the group's first module back to itself, inside the group.
        start = group[0]
        came: dict[str, Edge] = {}
        frontier = [start]
        while frontier and start not in came:
            nxt = []
            for v in frontier:
                for w, e in sorted(graph[v].items()):
                    if w in members and w not in came:
                        came[w] = e
                        nxt.append(w)
            frontier = nxt
        path = [came[start]]
        while path[-1].importer != start:
            path.append(came[path[-1].importer])
        cycles.append(path[::-1])
    return cycles


def describe(cycle: list[Edge]) -> str:
    return " -> ".join([cycle[0].importer] + [f"{e.target} ({e.file}:{e.line})" for e in cycle])


def test_megafleet_has_no_import_cycle():
    edges = import_edges(REPO / "megafleet")
    assert len(edges) > 100          # the scan sees the package's imports at all
    cycles = find_cycles(edges)
    assert not cycles, "module-level import cycles (defer one import into the function that needs " \
                       "it, or under TYPE_CHECKING):\n" + "\n".join(describe(c) for c in cycles)


def test_the_scan_finds_a_planted_cycle_and_ignores_deferred_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg import a\n")        # the package importing its own module
    (pkg / "a.py").write_text("import pkg.b\n")
    (pkg / "b.py").write_text("from .sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("try:\n    from ..a import x\nexcept ImportError:\n    pass\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\n"
                              "def f():\n    from pkg import e\n")
    (pkg / "e.py").write_text("from pkg.d import f\n")
    (cycle,) = find_cycles(import_edges(pkg))
    assert [(e.importer, e.target) for e in cycle] == [("pkg.a", "pkg.b"), ("pkg.b", "pkg.sub.c"),
                                                      ("pkg.sub.c", "pkg.a")]
    assert describe(cycle) == ("pkg.a -> pkg.b (pkg/a.py:1) -> pkg.sub.c (pkg/b.py:1) -> "
                               "pkg.a (pkg/sub/c.py:2)")


def test_the_scan_finds_the_two_broken_cycles_when_they_come_back(tmp_path):
    """The cycles issue 13 broke, planted again into a copy of megafleet/:
    graph importing model at run time (not under TYPE_CHECKING) while model
    imports graph, and the engine's spec importing the engine."""
    copy = tmp_path / "megafleet"
    shutil.copytree(REPO / "megafleet", copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    graph = copy / "netlang" / "graph.py"
    graph.write_text(graph.read_text().replace("if TYPE_CHECKING:", "if True:", 1))
    model = copy / "netlang" / "model.py"
    model.write_text(model.read_text() + "\nfrom megafleet.netlang import graph as _graph\n")
    spec = copy / "vm" / "spec.py"
    spec.write_text(spec.read_text() + "\nfrom megafleet.vm.engine import Engine\n")
    found = [sorted({e.importer for e in c}) for c in find_cycles(import_edges(copy))]
    assert sorted(found) == [["megafleet.netlang.graph", "megafleet.netlang.model"],
                             ["megafleet.vm.engine", "megafleet.vm.spec"]], found
