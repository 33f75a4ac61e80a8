"""The package's layout: no import cycle among its modules, and one copy of every module whichever name started it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

PACKAGE = REPO / "platform"


def module_name(path: Path) -> str:
    parts = ["lctrain", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere: at the top, in functions, under TYPE_CHECKING."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            target = target.replace("platform.", "lctrain.", 1) if target.startswith("platform.") else target
            for alias in node.names:  # `from . import lswt` imports a module; `from .x import f` imports x
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imported_modules(f, modules) for f in files}


def test_the_import_graph_sees_known_edges():
    graph = import_graph()
    assert "lctrain.models.layers.kernels" in graph["lctrain.models.layers.attention"]
    assert "lctrain.models.lswt" in graph["lctrain.models.registry"]  # `from . import lswt, ...`
    assert "lctrain.training.cli" in graph["lctrain.fit"]  # entry points import `lctrain.*` by name


def test_no_import_cycle_among_the_package_modules():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_a_checkout_run_loads_each_module_once_under_lctrain():
    """`python -m platform.fit` starts under the name `platform`; every module it then loads is `lctrain.*`, so
    a class named in a config (`lctrain.training.loggers.CSVLogger`) is the class the code checks against."""
    code = (
        "import runpy, sys; sys.argv = ['fit', '--help']\n"
        "try:\n    runpy.run_module('platform.fit', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "ours = sorted(m for m in sys.modules if m.startswith(('platform.', 'lctrain')))\n"
        "print('MODULES', ' '.join(ours))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    loaded = out.split("MODULES", 1)[1].split()
    assert "lctrain.training.cli" in loaded and "lctrain.models.lswt" in loaded
    assert [m for m in loaded if m.startswith("platform.")] == []  # platform.fit ran as __main__
