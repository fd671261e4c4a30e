"""The package's rooms stay layered: no upward import, no import between sibling rooms, no cycle.

Every ``import`` of every module is read with ``ast`` (function-level imports included, typing-only
imports under ``if TYPE_CHECKING:`` left out) and checked against the layers below, lowest first. A
module may import its own room and the rooms of lower layers only. ``docs/architecture.md`` shows the
same picture.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cameo_corr"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("cameo_corr.schemas",),
    ("cameo_corr.cli.errors", "cameo_corr.cli.args"),
    ("cameo_corr.datasets",),
    ("cameo_corr.pipeline", "cameo_corr.cache"),
    ("cameo_corr.job", "cameo_corr.train"),
    ("cameo_corr.demo", "cameo_corr.selfcheck"),
    ("cameo_corr.cli",),
)
"""Rooms by layer. Rooms of one layer are siblings: neither imports the other."""


def _room(module: str) -> tuple[int, str]:
    """``(layer, room)`` of a module: the longest room name it starts with."""
    best: tuple[int, str] | None = None
    for layer, rooms in enumerate(LAYERS):
        for room in rooms:
            if (module == room or module.startswith(room + ".")) and (best is None or len(room) > len(best[1])):
                best = (layer, room)
    if best is None:
        raise AssertionError(f"module {module} is in no room of LAYERS; add its room")
    return best


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _typing_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``path`` imports (at run time)."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _typing_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("cameo_corr"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cameo_corr"):
            for alias in node.names:  # `from pkg import module` imports the module
                full = f"{node.module}.{alias.name}"
                out.add(full if full in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in out if m in modules}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a room of the same or a higher layer (other than the module's own room)."""
    bad = []
    for module, imported in sorted(graph.items()):
        if module == "cameo_corr":
            continue
        layer, room = _room(module)
        for target in sorted(imported - {"cameo_corr"}):  # the package itself holds only the version
            t_layer, t_room = _room(target)
            if t_room != room and t_layer >= layer:
                bad.append(f"{module} (layer {layer}) imports {target} (layer {t_layer})")
    return bad


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that ends where it starts, or ``None``."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := dfs(module)):
            return cycle
    return None


def test_no_upward_or_sideways_import(graph: dict[str, set[str]]) -> None:
    bad = violations(graph)
    assert not bad, "\n".join(bad)


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_catch_violations(graph: dict[str, set[str]]) -> None:
    """The checks above can fail: an upward, a sideways import and a cycle added to the real graph are found."""
    broken = {k: set(v) for k, v in graph.items()}
    broken["cameo_corr.schemas.records"].add("cameo_corr.cache.reader")
    broken["cameo_corr.cache.reader"].add("cameo_corr.pipeline.match")
    assert violations(broken) == ["cameo_corr.cache.reader (layer 3) imports cameo_corr.pipeline.match (layer 3)",
                                  "cameo_corr.schemas.records (layer 0) imports cameo_corr.cache.reader (layer 3)"]
    broken["cameo_corr.cache.layout"].add("cameo_corr.cache.reader")
    assert find_cycle(broken) is not None
    with pytest.raises(AssertionError, match="no room"):
        _room("cameo_corr.elsewhere")
