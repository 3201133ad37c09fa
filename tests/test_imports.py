"""The shape of the package, read from its import statements (every one: top of module, inside a
function, under TYPE_CHECKING): no module imports itself back through others (no cycles), and no
package imports one above it. The layers are those of the package layout: files on disk ->
checkpoint -> spectral / metrics -> runtime -> analyses -> results -> figures -> report, with the
command line over everything."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: Small modules every layer may use: errors, ranges, files written safely, progress, threads,
#: the vocabularies of choices and module names, the version. They import only each other.
BOTTOM = frozenset({"errors", "ranges", "lazy", "progress", "threads", "locks", "safe_files", "textfiles", "choices",
                    "module_names", "version"})

#: What each part of moelens may import besides BOTTOM and itself. ``calibration`` (forward passes that
#: record routing) sits beside ``runtime``; ``merge`` (merged checkpoints) and ``zoo`` (trained tiny
#: models, checked with the interventions analysis) use the layers below them; ``testing`` (synthetic
#: runs, tiny checkpoints) and the atlas use anything but the command line, which nothing imports.
_BELOW_ANALYSES = {"checkpoint", "spectral", "metrics", "runtime", "calibration", "merge", "results"}
_ALL = {"checkpoint", "spectral", "metrics", "runtime", "calibration", "merge", "results", "analyses", "figures", "report",
        "zoo", "testing", "atlas", "atlas_pool"}
MAY_IMPORT: dict[str, set[str]] = {
    "checkpoint": set(),
    "spectral": {"checkpoint"},
    "metrics": {"checkpoint", "spectral"},
    "runtime": {"checkpoint", "metrics", "calibration"},
    "calibration": {"checkpoint", "runtime"},
    "merge": {"checkpoint", "metrics", "runtime"},
    "results": set(),
    "analyses": _BELOW_ANALYSES,
    "figures": {"results"},
    "report": {"results", "figures"},
    "zoo": {"checkpoint", "runtime", "results", "analyses"},
    "testing": _ALL - {"testing"},
    "atlas": _ALL - {"atlas", "testing"},
    "atlas_pool": set(),
    "cli": _ALL | {"surface"},
    "__main__": {"cli"},
    "surface": _ALL | {"cli"},
}

#: The analyses' declarations and their registry: what every outer layer derives its part of an
#: analysis from (the figure catalog, the report's sections, the commands). They import only the
#: standard library and BOTTOM, and name everything else as ``"module:function"`` strings, so any
#: part may read them.
DECLARATIONS = frozenset({"moelens.analyses.declaration", "moelens.analyses.registry"})


def modules() -> dict[str, Path]:
    """Every module of moelens by dotted name (a package by its own name)."""
    out = {}
    for path in (SRC / "moelens").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported(module: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The moelens modules ``module`` imports: ``from a.b import c`` names a.b.c where that is a
    module, else a.b (relative imports resolved)."""

    def resolve(name: str) -> str:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name

    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (resolve(a.name) for a in node.names if a.name.split(".")[0] == "moelens")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] != "moelens":
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield full if full in known else resolve(base)


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {m: set(imported(m, p, known)) - {m} for m, p in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def part(module: str) -> str:
    """``moelens.report.sections`` -> ``report``; the package itself -> ``moelens``; an analysis's
    ``surface`` module (its figure, report section, command summary and atlas runs, named by its
    declaration and imported only by name) -> ``surface``, the outermost part beside the command line."""
    names = module.split(".")
    if len(names) == 4 and names[1] == "analyses" and names[3] == "surface":
        return "surface"
    return names[1] if len(names) > 1 else module


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_is_read(graph):
    """The reader finds the imports it is meant to judge (a reader that found none would pass)."""
    assert len(graph) > 150
    assert "moelens.results.manifest" in graph["moelens.results.run"]
    assert "moelens.checkpoint.families.layouts" in graph["moelens.checkpoint.families.base"]
    assert "moelens.analyses.executors.base" in graph["moelens.analyses.executors.choice"]


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_no_upward_imports(graph):
    """Each part imports only what the layout puts below it (and the small BOTTOM modules)."""
    upward = []
    for module, targets in graph.items():
        mine = part(module)
        allowed = BOTTOM if mine in BOTTOM or mine == "moelens" else MAY_IMPORT[mine] | BOTTOM
        upward += [f"{module} -> {t}" for t in sorted(targets) if part(t) != mine and part(t) not in allowed and t not in DECLARATIONS]
    assert upward == []


def test_the_declarations_are_leaves(graph):
    """What every part may import imports nothing above the bottom."""
    for module in DECLARATIONS:
        assert {part(t) for t in graph[module]} - BOTTOM <= {"analyses"} and graph[module] <= DECLARATIONS | {f"moelens.{b}" for b in BOTTOM}


def test_nothing_below_the_surface_imports_a_surface(graph):
    """An analysis's surface is reached through its declaration's names only (the command line aside)."""
    assert [m for m, targets in graph.items() if part(m) not in ("surface", "cli") and any(part(t) == "surface" for t in targets)] == []


def test_nothing_imports_the_package_root(graph):
    """``import moelens`` is for users; inside the package a name is taken from the module that
    declares it (the version from :mod:`moelens.version`)."""
    assert [m for m, targets in graph.items() if "moelens" in targets] == []


def test_every_part_is_placed(graph):
    """A new part of the package is given its place in MAY_IMPORT (or BOTTOM) when it is added."""
    assert {part(m) for m in graph} - set(MAY_IMPORT) - BOTTOM - {"moelens"} == set()
