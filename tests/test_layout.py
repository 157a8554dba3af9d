"""The package layout of ../shared/DESIGN.md: the library never imports ``negpref.studies`` (paper
reproductions sit on top of everything), and no negpref modules import each other in a cycle.

The import graph is read from the source (every ``import``, also inside functions and under
``TYPE_CHECKING``), so an import that only runs in one code path is checked too.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import negpref

SRC = Path(negpref.__file__).resolve().parent.parent
STUDIES = "negpref.studies"
# What sits on top of the library: the paper reproductions, the command line (which runs them)
# and the benchmarks (``negpref bench u2a`` times the U2A toy study).
TOP = (STUDIES, "negpref.commands", "negpref.cli", "negpref.__main__", "negpref.bench")
# The flat U2A modules (negpref.u2a, negpref.u2a_*) import each other in a cycle (negpref.u2a <->
# negpref.u2a_implicit); it goes away with their move into the negpref.u2a package, which is
# under way separately. A cycle counts as theirs only if every module in it is one of them.
CYCLE_EXEMPT_PREFIX = "negpref.u2a"


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def module_files() -> dict[str, Path]:
    files = {}
    for path in sorted((SRC / "negpref").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """The negpref modules ``name``'s source imports: ``from a import b`` counts as ``a.b`` when
    that is a module, else as ``a``; relative imports are resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
    return found


def test_the_graph_finds_a_cycle_and_a_function_level_import(tmp_path):
    # The checks below pass vacuously if the graph misses edges: a made-up package shows it sees
    # relative, function-level and TYPE_CHECKING imports and reports their cycle.
    pkg = tmp_path / "negpref"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from negpref.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import f\n"
    )
    names = {"negpref", "negpref.a", "negpref.sub", "negpref.sub.b", "negpref.sub.c"}
    graph = {
        "negpref.a": imported_modules("negpref.a", pkg / "a.py", names),
        "negpref.sub.b": imported_modules("negpref.sub.b", pkg / "sub" / "b.py", names),
        "negpref.sub.c": imported_modules("negpref.sub.c", pkg / "sub" / "c.py", names),
    }
    assert graph == {
        "negpref.a": {"negpref.sub.b"},
        "negpref.sub.b": {"negpref.sub.c"},
        "negpref.sub.c": {"negpref.a"},
    }
    assert cycles(graph) == [["negpref.a", "negpref.sub.b", "negpref.sub.c"]]


def test_no_library_module_imports_the_studies():
    graph = import_graph()
    assert {"negpref.studies.demo.run", "negpref.studies.synthetic.study"} <= set(graph)
    offenders = {
        name: sorted(m for m in imported if _within(m, (STUDIES,)))
        for name, imported in graph.items()
        if not _within(name, TOP)
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_importing_the_library_loads_no_study():
    """What actually runs: every library module imported in a fresh interpreter, then no
    ``negpref.studies`` module in ``sys.modules`` (an import through a dependency counts)."""
    library = sorted(name for name in module_files() if not _within(name, TOP))
    assert "negpref.unlearn.runner" in library and "negpref.eval.tofu" in library
    script = (
        "import importlib, json, sys\n"
        f"for name in {library!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({STUDIES!r}))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_negpref_modules_import_no_cycle():
    graph = import_graph()
    found = [c for c in cycles(graph) if not all(m.startswith(CYCLE_EXEMPT_PREFIX) for m in c)]
    assert found == []
