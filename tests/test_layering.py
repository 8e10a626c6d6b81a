"""The package layering holds: no import cycle between choral's packages (counting imports inside
functions and under TYPE_CHECKING too), and no module imports another package's ``_private`` name.

A package is a folder under choral/ (``engine``, ``executor``...) or a top-level module
(``choral/tokenizer.py`` is the package ``tokenizer``)."""

from __future__ import annotations

import ast
from pathlib import Path

import choral

ROOT = Path(choral.__file__).parent


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "choral"


def _imports() -> list[tuple[str, str, str, str]]:
    """(importing package, imported module, imported name, where) for every ``from choral... import``."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "choral":
                for alias in node.names:
                    found.append((_package(module), node.module, alias.name, f"{path.name}:{node.lineno}"))
    return found


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_packages() -> None:
    edges: dict[str, set[str]] = {}
    where: dict[tuple[str, str], str] = {}
    for source, module, _, at in _imports():
        target = _package(module)
        if target not in (source, "choral"):  # choral/__init__ re-exports; importing it is the public API
            edges.setdefault(source, set()).add(target)
            where.setdefault((source, target), at)
    cycles = _cycles(edges)
    detail = [[f"{a} -> {b} ({where[a, b]})" for a in c for b in c if (a, b) in where] for c in cycles]
    assert not cycles, detail


def test_no_private_name_crosses_a_package() -> None:
    crossing = [f"{at}: {module}.{name}" for source, module, name, at in _imports()
                if name.startswith("_") and not name.startswith("__") and _package(module) != source]
    assert not crossing, crossing


def test_the_checks_see_a_cycle() -> None:
    """The detector itself: a planted cycle and a self-loop-free chain."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}}) == []
