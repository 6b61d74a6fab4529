"""The tree's shape: imports go one way (stages -> pipeline), with no circle between modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (at any depth of the file, lazy imports too)."""
    files = [p for pkg in ("pipeline", "stages") for p in (ROOT / pkg).rglob("*.py")]
    names = {module_name(p) for p in files}
    graph: dict[str, set[str]] = {}
    for p in files:
        me = module_name(p)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(p.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t in names and t != me:
                    deps.add(t)
        graph[me] = deps
    return graph


def test_pipeline_never_imports_stages() -> None:
    upward = {
        m: sorted(d for d in deps if d.startswith("stages"))
        for m, deps in import_graph().items()
        if m.startswith("pipeline")
    }
    assert {m: d for m, d in upward.items() if d} == {}


def test_no_import_circles() -> None:
    graph = import_graph()
    # Package __init__ files only re-export their own modules: an edge into a package counts as an
    # edge into nothing, so a module may import a sibling through its package.
    graph = {
        m: {d for d in deps if not (ROOT / d.replace(".", "/") / "__init__.py").exists()}
        for m, deps in graph.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert cycles == []


def test_the_cli_is_small() -> None:
    """Options are generated from config fields, so the CLI is wiring only (it had 666 lines)."""
    lines = (ROOT / "stages" / "cli.py").read_text().count("\n")
    assert lines < 333
