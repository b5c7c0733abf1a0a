"""The code's shape, read statically: no import circles, imports point one way, small files.

The import graph of ``diffseg_core``, ``pipeline`` and ``jobs`` is built from the source with
`ast`: every import statement counts, also those inside functions and under
``if TYPE_CHECKING:``, so a lazy import cannot hide a circle. An edge goes to the module
imported (``from pkg import mod`` -> ``pkg.mod``; ``from pkg.mod import name`` -> ``pkg.mod``);
importing ``pkg.mod`` runs ``pkg/__init__.py`` too, but that implied edge is not drawn (a
package's ``__init__`` naming its own modules is no circle).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOMS = ("diffseg_core", "pipeline", "jobs")  # each may import only the rooms before it
# Inside pipeline (its __init__'s docstring): which of its rooms each may import.
PIPELINE_ROOMS_MAY_USE = {"data": set(), "after": {"data"}, "job": {"data"}, "tune": {"data", "job", "after"}}
MAX_LINES = 600

# Files allowed over the size limit or inside a circle while a split is under way (issue 32 split
# plan.py and sources.py): empty, and it should stay so.
BEING_SPLIT: set[str] = set()


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    target: str  # imported module, dotted
    path: str    # importing file, relative to the repository
    line: int
    target_path: str  # imported file

    def __str__(self) -> str:
        return f"{self.path}:{self.line} imports {self.target}"


def source_files(root: Path) -> dict[str, str]:
    """Dotted module name -> file path relative to ``root``, for every .py file in the rooms."""
    out = {}
    for room in ROOMS:
        for path in sorted((root / room).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            parts = rel[:-3].split("/")
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = rel
    return out


def _targets(node: ast.Import | ast.ImportFrom, module: str, path: str, modules: dict[str, str]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
            package = package[:len(package) - (node.level - 1)]
            base = ".".join(package + ([node.module] if node.module else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    out = []
    for name in names:
        while name and name not in modules:  # `import pkg.mod.Name`-like spellings: the longest module
            name = name.rpartition(".")[0]
        if name and name != module and name not in out:
            out.append(name)
    return out


def import_graph(root: Path = REPO) -> list[Import]:
    """Every import, anywhere in a file, of one of the rooms' own modules."""
    modules = source_files(root)
    edges = []
    for module, path in modules.items():
        tree = ast.parse((root / path).read_text(encoding="utf-8"), filename=path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges += [Import(module, t, path, node.lineno, modules[t]) for t in _targets(node, module, path, modules)]
    return edges


def cycles(edges: list[Import], skip_paths: set[str] = frozenset()) -> list[list[Import]]:
    """One circle per group of modules that all reach each other (the shortest from the group's
    first module, as the imports that close it), leaving out the files of ``skip_paths``: a circle
    through one of them is not reported."""
    graph = _graph(edges, skip_paths)
    found = []
    for group in _strongly_connected(graph):
        if len(group) > 1:
            found.append(_one_circle(min(group), group, graph))
    return found


def _strongly_connected(graph: dict[str, list[Import]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(graph.get(start, ())))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                t = child.target
                if t not in index:
                    index[t] = low[t] = len(index)
                    stack.append(t)
                    on_stack.add(t)
                    work.append((t, iter(graph.get(t, ()))))
                elif t in on_stack:
                    low[node] = min(low[node], index[t])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    group.add(m)
                    if m == node:
                        break
                groups.append(group)
    return groups


def _one_circle(start: str, group: set[str], graph: dict[str, list[Import]]) -> list[Import]:
    """The shortest chain of imports from ``start`` back to it, inside ``group`` (breadth first)."""
    came: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for e in graph.get(node, ()):
                if e.target not in group or e.target in came:
                    continue
                came[e.target] = e
                if e.target == start:
                    chain = [e]
                    while chain[0].source != start:
                        chain.insert(0, came[chain[0].source])
                    return chain
                nxt.append(e.target)
        frontier = nxt
    raise AssertionError(f"{start} is in a circle but none was found")  # pragma: no cover


def wrong_way(edges: list[Import]) -> list[Import]:
    """Imports against the rooms' order (jobs -> pipeline -> diffseg_core, and inside pipeline)."""
    out = []
    for e in edges:
        src, dst = e.source.split("."), e.target.split(".")
        if ROOMS.index(dst[0]) > ROOMS.index(src[0]):
            out.append(e)
        elif (src[0] == dst[0] == "pipeline" and len(src) > 2 and len(dst) > 2 and src[1] in PIPELINE_ROOMS_MAY_USE
              and dst[1] in PIPELINE_ROOMS_MAY_USE and dst[1] != src[1]
              and dst[1] not in PIPELINE_ROOMS_MAY_USE[src[1]]):
            out.append(e)
    return out


def _describe(circle: list[Import]) -> str:
    return " -> ".join([circle[0].source] + [e.target for e in circle]) + "".join(f"\n    {e}" for e in circle)


def _graph(edges: list[Import], skip_paths: set[str] = frozenset()) -> dict[str, list[Import]]:
    graph: dict[str, list[Import]] = {}
    for e in edges:
        if e.path not in skip_paths and e.target_path not in skip_paths:
            graph.setdefault(e.source, []).append(e)
    return graph


def _group(module: str, edges: list[Import], skip_paths: set[str]) -> set[str]:
    """The modules in one circle with ``module`` (for the message)."""
    return next(g for g in _strongly_connected(_graph(edges, skip_paths)) if module in g)


# --- the repository ---------------------------------------------------------------------------

def test_there_are_no_import_circles():
    edges = import_graph()
    found = cycles(edges, skip_paths=BEING_SPLIT)
    if found:
        pytest.fail("import circles (move what both sides share into a module both import):\n  " + "\n  ".join(
            _describe(c) + f"\n    (all in one circle: {', '.join(sorted(_group(c[0].source, edges, BEING_SPLIT)))})" for c in found))


def test_imports_point_one_way_between_the_rooms():
    found = wrong_way(import_graph())
    if found:
        pytest.fail("imports against jobs -> pipeline -> diffseg_core (or pipeline's rooms):\n  " +
                    "\n  ".join(str(e) for e in found))


def test_no_source_file_is_over_600_lines():
    sizes = {path: len((REPO / path).read_text(encoding="utf-8").splitlines())
             for path in source_files(REPO).values()}
    over = sorted(f"{path}: {n} lines" for path, n in sizes.items() if n > MAX_LINES and path not in BEING_SPLIT)
    if over:
        pytest.fail(f"source files over {MAX_LINES} lines (split them by concern):\n  " + "\n  ".join(over))
    done = sorted(p for p in BEING_SPLIT if sizes.get(p, 0) <= MAX_LINES)
    assert not done, f"split already (or gone): take them off BEING_SPLIT: {', '.join(done)}"


# --- the checks themselves, on small trees ------------------------------------------------------

def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    for room in ROOMS:
        (root / room).mkdir(exist_ok=True)
        (root / room / "__init__.py").touch()
    return root


def test_a_circle_through_a_lazy_relative_import_is_found_and_named(tmp_path):
    root = _tree(tmp_path, {
        "diffseg_core/a.py": "from diffseg_core import b\n",
        "diffseg_core/b.py": "def f():\n    from .c import thing\n",
        "diffseg_core/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import diffseg_core.a\n",
        "diffseg_core/d.py": "import diffseg_core.a\n",  # into the circle, not part of it
    })
    found = cycles(import_graph(root))
    assert len(found) == 1
    assert _describe(found[0]).splitlines()[0] == "diffseg_core.a -> diffseg_core.b -> diffseg_core.c -> diffseg_core.a"
    assert [str(e) for e in found[0]] == ["diffseg_core/a.py:1 imports diffseg_core.b",
                                          "diffseg_core/b.py:2 imports diffseg_core.c",
                                          "diffseg_core/c.py:3 imports diffseg_core.a"]


def test_a_circle_only_through_a_file_being_split_is_allowed_and_no_other(tmp_path):
    root = _tree(tmp_path, {
        "pipeline/job/__init__.py": "",
        "pipeline/job/plan.py": "from pipeline.job.preflight import check\n",
        "pipeline/job/preflight.py": "def check():\n    from pipeline.job.plan import label\n",
        "pipeline/job/x.py": "import pipeline.job.y\n",
        "pipeline/job/y.py": "import pipeline.job.x\n",
    })
    edges = import_graph(root)
    assert len(cycles(edges)) == 2
    assert [c[0].source for c in cycles(edges, skip_paths={"pipeline/job/plan.py"})] == ["pipeline.job.x"]


def test_a_package_naming_its_own_modules_is_no_circle(tmp_path):
    root = _tree(tmp_path, {
        "diffseg_core/__init__.py": "from diffseg_core.a import A\n",
        "diffseg_core/a.py": "from diffseg_core import b\nA = 1\n",
        "diffseg_core/b.py": "",
    })
    assert cycles(import_graph(root)) == []


def test_imports_against_the_rooms_order_are_found(tmp_path):
    root = _tree(tmp_path, {
        "diffseg_core/a.py": "def f():\n    import pipeline\n",
        "pipeline/cli.py": "from jobs import spec\n",
        "pipeline/data/__init__.py": "",
        "pipeline/data/io.py": "from pipeline.job.plan import label\nfrom pipeline import errors\n",
        "pipeline/errors.py": "",
        "pipeline/job/__init__.py": "",
        "pipeline/job/plan.py": "from pipeline.data import io\nimport diffseg_core.a\n",
        "pipeline/after/__init__.py": "",
        "pipeline/after/eval.py": "from pipeline.job import plan\n",
        "pipeline/tune/__init__.py": "",
        "pipeline/tune/run.py": "from pipeline.job import plan\nfrom pipeline.after import eval\n",
        "jobs/spec.py": "import pipeline.cli\nimport diffseg_core.a\n",
    })
    assert sorted(str(e) for e in wrong_way(import_graph(root))) == [
        "diffseg_core/a.py:2 imports pipeline",
        "pipeline/after/eval.py:1 imports pipeline.job.plan",
        "pipeline/cli.py:1 imports jobs.spec",
        "pipeline/data/io.py:1 imports pipeline.job.plan",
    ]


@pytest.mark.parametrize("spelling, target", [
    ("import pipeline.job.plan", "pipeline.job.plan"),
    ("from pipeline.job import plan", "pipeline.job.plan"),
    ("from pipeline.job.plan import label as run", "pipeline.job.plan"),
    ("from pipeline import label", "pipeline"),
    ("from . import plan", "pipeline.job.plan"),
    ("from .plan import label", "pipeline.job.plan"),
    ("from ..data import io", "pipeline.data.io"),
    ("from .. import errors", "pipeline.errors"),
])
def test_each_spelling_of_an_import_is_an_edge(tmp_path, spelling, target):
    root = _tree(tmp_path, {
        "pipeline/errors.py": "", "pipeline/data/__init__.py": "", "pipeline/data/io.py": "",
        "pipeline/job/__init__.py": "", "pipeline/job/plan.py": "",
        "pipeline/job/user.py": f"import os\n{spelling}\n",
    })
    assert [e.target for e in import_graph(root) if e.source == "pipeline.job.user"] == [target]
