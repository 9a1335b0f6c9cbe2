"""The layout's rules, read from the source with `ast`: no import circle, no private name used across modules,
short functions, and a README that names every package (README "How the code is laid out")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lungxray"
MAX_FUNCTION_LINES = 60
# Functions still over the limit, each to be split; empty since issue 20, and nothing may join it.
STILL_LONG: set[str] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(tree: ast.Module, modules: set[str]) -> list[tuple[str, str]]:
    """(module imported, name) for every `from lungxray... import name`, at module level or inside functions."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lungxray"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.append((full if full in modules else node.module, alias.name))
        elif isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.startswith("lungxray.")]
    return found


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    modules = set(sources)
    return {name: {m for m, _ in _imports(tree, modules) if m in modules and m not in (name, "lungxray")}
            for name, tree in sources.items()}


def _cycle_from(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in graph[node]:
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_no_import_circle_in_the_package() -> None:
    graph = _graph()
    cycles = [c for m in sorted(graph) if (c := _cycle_from(m, graph))]
    assert not cycles, "import circle: " + " -> ".join(cycles[0])


def test_the_checker_sees_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle_from("a", graph) == ["a", "b", "c", "a"] and _cycle_from("d", graph) is None


def test_no_private_name_is_imported_across_modules() -> None:
    sources = _sources()
    private = [f"{name} imports {module}.{what}" for name, tree in sources.items()
               for module, what in _imports(tree, set(sources))
               if what.startswith("_") and not what.startswith("__")]
    assert not private, private


def _long_functions() -> dict[str, int]:
    out = {}
    for name, tree in _sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out[f"{name}.{node.name}"] = lines
    return out


def test_functions_are_short() -> None:
    long = _long_functions()
    assert set(long) <= STILL_LONG, f"over {MAX_FUNCTION_LINES} lines: {sorted(set(long) - STILL_LONG)}"


@pytest.mark.parametrize("package", sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()))
def test_the_readme_names_every_package(package: str) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## How the code is laid out", 1)[-1].split("\n## ", 1)[0]
    assert f"  {package}/" in section, f"README 'How the code is laid out' does not list {package}/"
