"""The package layout is the architecture: no import circles, imports point down only.

Every import counts, lazy ones inside functions included. Layers, low to high:

    paths
    models, worlds, study                 backbones and recipes; the worlds' data; votes
    rewards -> distill -> training        reward models, stage math, run machinery
    evaluation                            paper metrics for real models, the results report
    digits, scenes                        experiments on each world (scenes may reuse digits')
    app                                   support code for the UI (settings, model service)
    bench, cli                            benchmarks, the command line
    ui_common -> train_tab, compare_tab -> app.py      the UI
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "hypersd_core"
UI_PACKAGES = ("ui_common", "train_tab", "compare_tab")

# What each subpackage of hypersd_core may import from hypersd_core (besides itself and
# ``paths``). A subpackage not listed here is still held to the no-circle tests below.
ALLOWED = {
    "models": set(),
    "worlds": set(),
    "study": set(),
    "rewards": {"models", "worlds"},
    "distill": {"models", "rewards", "worlds"},
    "training": {"models", "distill", "rewards", "worlds"},
    "evaluation": {"models", "rewards", "worlds"},
    # the world-agnostic protocol (budgets, run graph, statistics, the World interface):
    # below the worlds' experiments, which plug into it
    "protocol": {"models", "training", "worlds"},
    "digits": {"models", "distill", "rewards", "training", "evaluation", "worlds", "protocol"},
    "scenes": {"models", "distill", "rewards", "training", "evaluation", "worlds", "digits",
               "protocol"},
    "app": {"models", "distill", "rewards", "training", "evaluation", "worlds", "digits",
            "scenes", "study", "protocol"},
    "bench": {"models", "distill", "rewards", "training", "evaluation", "worlds", "digits",
              "scenes", "study", "app", "protocol"},
}
# The UI packages: what each may import besides hypersd_core (tabs never import each other).
UI_ALLOWED = {"ui_common": set(), "train_tab": {"ui_common"}, "compare_tab": {"ui_common"}}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Absolute names ``path`` imports (relative imports resolved), ``from x import y`` as
    both ``x`` and ``x.y``."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module:
                out.add(module)
                out.update(f"{module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _source_files() -> list[Path]:
    files = list(PKG.rglob("*.py")) + [ROOT / "app.py"]
    for ui in UI_PACKAGES:
        files += list((ROOT / ui).rglob("*.py"))
    return files


def _package(module: str) -> str | None:
    """The unit the layer rules speak of: ``hypersd_core.<sub>``, a UI package, or ``app``."""
    parts = module.split(".")
    if parts[0] == "hypersd_core":
        return ".".join(parts[:2]) if len(parts) > 1 else None
    if parts[0] in UI_PACKAGES or module == "app":
        return parts[0]
    return None


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    return {m: {i for i in _imports(p, top_level_only) if i in modules and i != m}
            for m, p in modules.items()}


def _package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in _source_files():
        src = _package(_module_name(path))
        if src is None:
            continue
        targets = {_package(i) for i in _imports(path)} - {None, src}
        graph.setdefault(src, set()).update(targets)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
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
    # A package's __init__ re-export is not counted as a dependency of its own members.
    graph = _graph(top_level_only=False)
    for m in graph:
        graph[m] = {i for i in graph[m] if not m.startswith(i + ".")}
    assert _cycles(graph) == []


def test_no_two_packages_import_each_other():
    graph = _package_graph()
    mutual = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a]
                     if a in graph.get(b, ())})
    assert mutual == [], f"packages importing each other: {mutual}"
    assert _cycles(graph) == [], "import circle between packages"


def test_package_rules_catch_a_mutual_import(tmp_path, monkeypatch):
    # The checker itself: a lazy import back from evaluation into digits is a circle.
    layout = sys.modules[__name__]

    fake = tmp_path / "hypersd_core"
    for sub, code in {"digits": "from hypersd_core.evaluation import paper_metrics\n",
                      "evaluation": "def f():\n    from hypersd_core.digits import evaluate\n"}.items():
        (fake / sub).mkdir(parents=True)
        (fake / sub / "__init__.py").write_text("")
        (fake / sub / "m.py").write_text(code)
    (tmp_path / "app.py").write_text("")
    monkeypatch.setattr(layout, "ROOT", tmp_path)
    monkeypatch.setattr(layout, "PKG", fake)
    graph = layout._package_graph()
    assert graph["hypersd_core.evaluation"] == {"hypersd_core.digits"}
    assert layout._cycles(graph) != []


def test_imports_point_down():
    bad = []
    for path in PKG.rglob("*.py"):
        module = _module_name(path)
        parts = module.split(".")
        if len(parts) < 2 or parts[1] not in ALLOWED:
            continue
        sub = parts[1]
        for imp in _imports(path):
            top = imp.split(".")[0]
            if top in UI_PACKAGES or top == "app":
                bad.append(f"{module} imports the UI: {imp}")
            if imp.startswith("hypersd_core."):
                target = imp.split(".")[1]
                if target not in (sub, "paths") and target not in ALLOWED[sub] \
                        and (PKG / target).is_dir():
                    bad.append(f"{module} imports {imp}")
    assert bad == []


def test_ui_tabs_do_not_import_each_other():
    bad = []
    for ui, allowed in UI_ALLOWED.items():
        for path in (ROOT / ui).rglob("*.py"):
            for imp in _imports(path):
                top = imp.split(".")[0]
                if top in UI_PACKAGES and top != ui and top not in allowed:
                    bad.append(f"{_module_name(path)} imports {imp}")
                if top == "app":
                    bad.append(f"{_module_name(path)} imports {imp}")
    assert bad == []
