"""The one-way architecture (docs/architecture.md): every import goes to the same layer or a lower one, no module
imports itself back through others, no source file is over 450 lines, and recipes never reach into the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "spkprune"

# Bottom to top. A module may import its own layer and the ones below it.
LAYERS = [
    {"errors", "version", "settings", "paths"},
    {"models", "store", "data"},
    {"checkpoint", "__init__"},
    {"training", "counting"},
    {"pruning", "selection", "export", "compact", "bench", "sensitivity"},
    {"recipes"},
    {"cli", "__main__"},
]


def _room(module: str) -> str:
    """`spkprune.training.loop` -> `training`; `spkprune` (the package itself) -> `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(room: str) -> int:
    return next(index for index, rooms in enumerate(LAYERS) if room in rooms)


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("spkprune")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spkprune"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_every_room_has_a_layer():
    rooms = {_room(name) for name in _modules()}
    assert rooms <= set().union(*LAYERS), rooms - set().union(*LAYERS)


def test_no_import_runs_upward():
    modules = _modules()
    upward = []
    for name, path in modules.items():
        for target in _imports(path, top_level_only=False):
            found = _resolve(target, modules)
            if found and _layer(_room(found)) > _layer(_room(name)):
                upward.append(f"{name} -> {found}")
    assert not upward, upward


def test_no_import_circle():
    modules = _modules()
    graph = {
        name: {found for t in _imports(path, top_level_only=True) if (found := _resolve(t, modules)) and found != name}
        for name, path in modules.items()
    }
    # A package's __init__ hands names on; importing a submodule runs its package's __init__ anyway.
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
    circles = []
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, circles


@pytest.mark.parametrize("limit", [450])
def test_no_source_file_is_over_the_limit(limit):
    long = {str(path.relative_to(PACKAGE.parent)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > limit}
    assert not long, long


def test_recipes_import_nothing_from_the_cli():
    for path in (PACKAGE / "recipes").rglob("*.py"):
        assert not any(t.startswith("spkprune.cli") for t in _imports(path, top_level_only=False)), path
