"""The package layout is the architecture: no import circles, imports point down only."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "hypersd_core"

# What each subpackage may import from hypersd_core (besides itself and ``paths``).
ALLOWED = {
    "models": set(),
    "distill": {"models", "rewards", "worlds"},
    "worlds": set(),
    "rewards": {"models", "worlds"},
    "digits": {"models", "distill", "rewards", "training", "evaluation", "worlds"},
}
FORBIDDEN_FOR_CORE = ("hypersd_core.training", "hypersd_core.app", "hypersd_core.cli",
                      "train_tab", "compare_tab", "app")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    return {m: {i for i in _imports(p, top_level_only) if i in modules and i != m}
            for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_circle_between_modules():
    # Every import, lazy ones inside functions included; a package's __init__ re-export is
    # not counted as a dependency of its own members.
    graph = _graph(top_level_only=False)
    for m in graph:
        graph[m] = {i for i in graph[m] if not m.startswith(i + ".")}
    assert _cycles(graph) == []


def test_imports_point_down():
    bad = []
    for path in PKG.rglob("*.py"):
        module = _module_name(path)
        parts = module.split(".")
        if len(parts) < 2 or parts[1] not in ALLOWED:
            continue
        sub = parts[1]
        for imp in _imports(path, top_level_only=False):
            if imp.startswith(FORBIDDEN_FOR_CORE) and sub in ("models", "distill"):
                bad.append(f"{module} imports {imp}")
            if imp.startswith("hypersd_core."):
                target = imp.split(".")[1]
                if target not in (sub, "paths") and target not in ALLOWED[sub] \
                        and (PKG / target).is_dir():
                    bad.append(f"{module} imports {imp}")
    assert bad == []
