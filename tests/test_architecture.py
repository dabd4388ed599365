"""The house: the library imports downward only, never the command line, and no module imports
itself back through others (checked from the source's import statements, lazy ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"
PACKAGE = "tidy_detect"


def _modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / PACKAGE).rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        targets.update(n for n in names if n in modules and n != name)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _is_cli(name: str) -> bool:
    return name == f"{PACKAGE}.cli" or name.startswith(f"{PACKAGE}.cli.")


def test_no_library_module_imports_the_command_line():
    offenders = {m: sorted(d for d in deps if _is_cli(d)) for m, deps in _graph().items() if not _is_cli(m)}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_there_are_no_import_circles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert cycles == []


def test_the_view_math_lies_below_the_models_and_the_extractor():
    graph = _graph()
    assert f"{PACKAGE}.views" in graph[f"{PACKAGE}.models.clip"]
    assert f"{PACKAGE}.views" in graph[f"{PACKAGE}.features.extractor"]
    assert not any(d.startswith(f"{PACKAGE}.features") for d in graph[f"{PACKAGE}.models.clip"])
    assert graph[f"{PACKAGE}.views"] <= {f"{PACKAGE}.errors"}
