"""The import rules of ARCHITECTURE.md, read from the source: one direction (service -> agents -> autoprune) and
no import circles, counting imports inside functions too (a lazy import is still a dependency) but not the ones
under ``if TYPE_CHECKING:`` (annotations only)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("autoprune", "agents", "service")
ALLOWED_UPWARD = {("autoprune.job", "agents")}
"""The facade ``autoprune.search(...)`` may import strategies at call time (ARCHITECTURE.md)."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Project modules ``module`` imports at run time (anywhere in the file, TYPE_CHECKING blocks excluded)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "migrations" not in p.parts}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        raw = _imports(ast.parse(path.read_text(encoding="utf-8")), name, path.name == "__init__.py")
        graph[name] = {m for m in raw if m in files and m != name}
    return graph


GRAPH = _graph()


def test_the_graph_is_read() -> None:
    assert "autoprune.objective" in GRAPH and "autoprune.recovery" in GRAPH["autoprune.objective"]
    assert "agents.base" in GRAPH["agents.baselines"]


@pytest.mark.parametrize(("lower", "upper"), [("autoprune", "agents"), ("autoprune", "service"), ("agents", "service")])
def test_imports_go_one_way(lower: str, upper: str) -> None:
    wrong = sorted(
        (module, target)
        for module, targets in GRAPH.items()
        if module.split(".")[0] == lower
        for target in targets
        if target.split(".")[0] == upper and (module, upper) not in ALLOWED_UPWARD
    )
    assert wrong == [], f"{lower} must not import {upper}: {wrong}"


def test_no_import_circles() -> None:
    # a package importing its own submodules (agents/__init__ re-exporting agents.base) is not a circle; edges from a
    # package's __init__ to its children are left out, edges into a package name are kept
    children = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in GRAPH.items()}
    circles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(children.get(node, ())):
            if state.get(nxt) == 1:
                circles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(children):
        if node not in state:
            visit(node)
    assert circles == [], "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_records_and_the_repository_are_torch_free() -> None:
    # the API process reads stored evaluations as autoprune.records objects without importing torch
    import subprocess
    import sys

    code = (
        "import sys, autoprune.records, autoprune.plan, agents.base, service.db.repository, service.worker\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"
