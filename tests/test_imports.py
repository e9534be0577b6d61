"""The package's import structure: vldistill's modules import each other without a cycle, no function-level
import hides one, `vldistill.models` never imports `vldistill.data`, and every module imports alone in a
fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "vldistill"

# Function-level imports of vldistill modules outside cli.py, each with the reason it is not a cycle dodge.
LATE_IMPORT_ALLOWED: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Edge:
    """One import of a vldistill module by another: where it is written and whether inside a function."""

    source: str
    target: str
    line: int
    late: bool


def module_files(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under src/vldistill (a package is named by its __init__)."""
    modules = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _absolute(node: ast.ImportFrom, source: str, modules: dict[str, Path]) -> Optional[str]:
    """The module an ImportFrom names, with a relative import resolved against the importing module."""
    if not node.level:
        return node.module
    package = source.split(".") if _is_package(source, modules) else source.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _owner(name: str, modules: dict[str, Path]) -> Optional[str]:
    """The longest vldistill module that `name` is or lies inside (`vldistill.x.Thing` -> `vldistill.x`)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


class _Collector(ast.NodeVisitor):
    """Gathers a module's imports of vldistill modules, noting whether each sits inside a function."""

    def __init__(self, source: str, modules: dict[str, Path]) -> None:
        self.source, self.modules = source, modules
        self.edges: list[Edge] = []
        self.depth = 0

    def _add(self, name: Optional[str], line: int) -> None:
        if name and (name == PACKAGE or name.startswith(PACKAGE + ".")):
            target = _owner(name, self.modules)
            if target is None:
                raise AssertionError(f"{self.modules[self.source]}:{line}: import of unknown module {name}")
            if target != self.source:
                self.edges.append(Edge(self.source, target, line, self.depth > 0))

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = _absolute(node, self.source, self.modules)
        for alias in node.names:
            # `from vldistill.x import y` imports module vldistill.x.y when y is a submodule, else vldistill.x.
            self._add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in self.modules else module, node.lineno)

    def visit_Call(self, node: ast.Call) -> None:
        # importlib.import_module("vldistill.x") / __import__("vldistill.x") is an import too.
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            if isinstance(node.args[0].value, str):
                self._add(node.args[0].value, node.lineno)
        self.generic_visit(node)


def import_edges(src: Path = SRC) -> list[Edge]:
    """Every import of a vldistill module by a vldistill module, module-level and function-level alike.
    Importing `vldistill.x.y` also runs the package `vldistill.x`, so a parent package counts as imported."""
    modules = module_files(src)
    edges = []
    for name, path in modules.items():
        collector = _Collector(name, modules)
        collector.visit(ast.parse(path.read_text(), filename=str(path)))
        for edge in collector.edges:
            edges.append(edge)
            parent = edge.target.rpartition(".")[0]
            while parent and parent != PACKAGE and not name.startswith(parent + ".") and name != parent:
                edges.append(Edge(name, parent, edge.line, edge.late))
                parent = parent.rpartition(".")[0]
    return edges


def find_cycle(edges: list[Edge]) -> Optional[list[str]]:
    """One import cycle as a module path [a, b, ..., a], or None when the graph is acyclic (depth-first search)."""
    graph: dict[str, list[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, [])
        if edge.target not in graph[edge.source]:
            graph[edge.source].append(edge.target)
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> Optional[list[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, [])):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_find_cycle_reports_the_path() -> None:
    """The cycle finder itself: a -> b -> c -> a is reported as that path; a chain is acyclic."""
    chain = [Edge("a", "b", 1, False), Edge("b", "c", 1, False)]
    assert find_cycle(chain) is None
    assert find_cycle(chain + [Edge("c", "a", 1, True)]) == ["a", "b", "c", "a"]


def test_collector_resolves_submodules_and_relative_imports(tmp_path: Path) -> None:
    """`from pkg.x import y` names submodule pkg.x.y when it exists, else pkg.x; relative imports resolve;
    imports inside a function are marked late; importing pkg.x.y also imports the package pkg.x."""
    root = tmp_path / PACKAGE
    (root / "x").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "x" / "__init__.py").write_text("")
    (root / "x" / "y.py").write_text("VALUE = 1\n")
    (root / "a.py").write_text(
        "from vldistill.x import y\nfrom vldistill.x.y import VALUE\nfrom .x import y as z\n"
        "def f():\n    from vldistill import x\n"
    )
    edges = {(e.source, e.target, e.late) for e in import_edges(tmp_path)}
    assert edges == {
        ("vldistill.a", "vldistill.x.y", False),
        ("vldistill.a", "vldistill.x", False),
        ("vldistill.a", "vldistill.x", True),
    }


def test_no_import_cycle() -> None:
    """vldistill's internal import graph (module-level and function-level imports) has no cycle."""
    cycle = find_cycle(import_edges())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_late_imports_of_vldistill_modules() -> None:
    """Imports of vldistill modules sit at module level, except the CLI's lazy subcommand imports and the
    allow-listed ones above (each with its reason)."""
    late = sorted(
        f"{SRC / edge.source.replace('.', '/')}:{edge.line}: {edge.source} imports {edge.target} inside a function"
        for edge in import_edges()
        if edge.late and edge.source != f"{PACKAGE}.cli" and (edge.source, edge.target) not in LATE_IMPORT_ALLOWED
    )
    assert not late, "\n".join(dict.fromkeys(late))


# Layers that must not reach up: (importer, imported, why). A name covers the module and everything under it.
FORBIDDEN = [
    (f"{PACKAGE}.models", f"{PACKAGE}.data", "models sit below data: data prepares batches for a model's input spec"),
    (f"{PACKAGE}.teachers", f"{PACKAGE}.train", "teachers (and their cache) are assembled from configs and data, not from training"),
    (f"{PACKAGE}.models", f"{PACKAGE}.teachers", "models sit below teachers: a teacher is assembled from models"),
    (f"{PACKAGE}.losses", f"{PACKAGE}.teachers", "losses read signals (models/signals.py), whoever produced them"),
    (f"{PACKAGE}.binding", PACKAGE, "the YAML binder is the ground floor: it imports nothing of vldistill"),
]


def _within(module: str, name: str) -> bool:
    return module == name or module.startswith(name + ".")


@pytest.mark.parametrize("importer, imported, why", FORBIDDEN, ids=[f"{a} -/-> {b}" for a, b, _ in FORBIDDEN])
def test_layers_never_import_upward(importer: str, imported: str, why: str) -> None:
    """No module under `importer` imports a module under `imported` (vldistill.models never imports vldistill.data)."""
    wrong = sorted(
        {f"{edge.source} imports {edge.target} (line {edge.line})" for edge in import_edges()
         if _within(edge.source, importer) and _within(edge.target, imported)}
    )
    assert not wrong, f"{why}:\n" + "\n".join(wrong)


_IMPORT_EACH = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "vldistill" or m.startswith("vldistill.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ":\\n" + traceback.format_exc())
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow  # a fresh interpreter imports torch and transformers (about 10 s)
def test_every_module_imports_alone() -> None:
    """Each module imports as the first vldistill import of an interpreter (sys.modules cleared of vldistill
    between modules; third-party modules stay loaded, so one subprocess serves them all)."""
    names = list(module_files())
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, *names], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
