"""The package's layers, as the tree shows them: no import cycle, and the method free of Lightning.

Imports are read from the source (every ``import`` statement, also those under ``TYPE_CHECKING`` and inside
functions), so a cycle hidden from the interpreter is still one here.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import anomalib_anomalyclip

PACKAGE = Path(anomalib_anomalyclip.__file__).parent
NAME = "anomalib_anomalyclip"
LIGHTNING_PARTS = (
    "lightning",
    "pytorch_lightning",
    "anomalib.models",
    "anomalib.engine",
    "anomalib.callbacks",
    "anomalib.cli",
    "anomalib.pre_processing",
    "anomalib.post_processing",
    "anomalib.metrics",
    "anomalib.visualization",
    "anomalib.deploy",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path) -> Iterator[str]:
    """Every module ``name`` imports (absolute names; ``from x import y`` also counts ``x.y`` when it is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {found for found in _imports(name, path) if found in modules} - {name} for name, path in modules.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_cycle() -> None:
    graph = _graph()
    graph = {
        name: {target for target in targets if not name.startswith(target + ".")} for name, targets in graph.items()
    }
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def _is_lightning(target: str) -> bool:
    return any(target == part or target.startswith(f"{part}.") for part in LIGHTNING_PARTS)


def test_the_method_layer_imports_no_lightning_and_nothing_of_the_layers_above() -> None:
    below = tuple(f"{NAME}.{name}" for name in ("method", "config", "errors", "weights", "cache"))
    found = sorted(
        f"{path.name}: {target}"
        for path in (PACKAGE / "method").rglob("*.py")
        for target in _imports(_module_name(path), path)
        if _is_lightning(target) or (target.startswith(f"{NAME}.") and not target.startswith(below))
    )
    assert not found, found
