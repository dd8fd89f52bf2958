"""The agent's import graph, read from the source with ast: no cycles between modules or between subpackages.

Every import counts, also those inside functions (a lazy import only hides a cycle) and under TYPE_CHECKING.
Subpackages are the agent's first-level folders (capture, engine, decision, ...); each top-level module
(config.py, ring.py, ...) is a node of its own. The agent never imports the trainer, deploy or torch.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

AGENT = Path(__file__).resolve().parents[2] / "agent"
FORBIDDEN = {"torch", "trainer", "deploy"}  # first parts of dotted names, `lineguard.` dropped


def module_name(path: Path, root: Path) -> str:
    """agent/capture/base.py -> agent.capture.base; agent/capture/__init__.py -> agent.capture."""
    parts = (root.name, *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(path: Path, root: Path) -> str:
    """The package relative imports in path start from."""
    module = module_name(path, root)
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imported_names(path: Path, package: str) -> set[str]:
    """Absolute dotted names path imports (`from X import y` gives X.y and X), `lineguard.` dropped."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {name.removeprefix("lineguard.") for name in names}


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: the agent modules it imports} for every module under root (the agent package folder)."""
    paths = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        names = imported_names(path, package_of(path, root))
        # `from .pkg import name` is an edge to pkg.name when that is a module, else to pkg itself.
        graph[module] = {n for n in names if n in paths and n != module and not _has_submodule(n, names, paths)}
    return graph


def _has_submodule(name: str, names: set[str], modules: dict[str, Path]) -> bool:
    return any(other.startswith(f"{name}.") and other in modules for other in names)


def subpackage_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph collapsed onto first-level subpackages (agent.engine.backends.x -> agent.engine)."""

    def node(module: str) -> str:
        return ".".join(module.split(".")[:2])

    collapsed: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if module.count(".") == 0:  # the agent package's own __init__
            continue
        collapsed.setdefault(node(module), set()).update(node(t) for t in targets if t.count(".") > 0)
    return {source: targets - {source} for source, targets in collapsed.items()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every node an import chain from start reaches (start itself only through a cycle)."""
    seen: set[str] = set()
    todo = list(graph.get(start, ()))
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of nodes that import each other (strongly connected components of 2+), each sorted."""
    reach = {node: reachable(graph, node) for node in graph}
    groups = {tuple(sorted(n for n in reach[node] if node in reach[n])) for node in graph if node in reach[node]}
    return sorted(list(group) for group in groups)


def describe(components: Iterable[list[str]], graph: dict[str, set[str]]) -> str:
    """Each cycle with the edges inside it, so the failure names the imports to break."""
    lines = []
    for component in components:
        members = set(component)
        edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
        lines.append("cycle: " + "; ".join(edges))
    return "\n".join(lines)


def test_no_agent_module_imports_itself_in_a_circle():
    graph = import_graph(AGENT)
    assert "agent.capture.sources" in graph and "agent.engine.process" in graph  # the graph is really read
    found = cycles(graph)
    assert not found, describe(found, graph)


def test_no_two_agent_subpackages_import_each_other():
    graph = subpackage_graph(import_graph(AGENT))
    assert {"agent.capture", "agent.engine", "agent.decision", "agent.config"} <= graph.keys()
    found = cycles(graph)
    assert not found, describe(found, graph)


def test_the_agent_never_imports_the_trainer_deploy_or_torch():
    offenders = {
        f"{module_name(path, AGENT)} imports {name}"
        for path in sorted(AGENT.rglob("*.py"))
        for name in imported_names(path, package_of(path, AGENT))
        if name.split(".")[0] in FORBIDDEN
    }
    assert not offenders, sorted(offenders)


def test_the_checks_find_the_cycles_they_are_meant_to_catch(tmp_path):
    root = tmp_path / "agent"
    files = {
        "__init__.py": "",
        "config.py": "",
        "capture/__init__.py": "from .sources import open_source\n",
        "capture/sources.py": "def open_source():\n    from .aravis import Camera\n",
        "capture/aravis.py": "from .sources import CHANNELS\nfrom ..config import X\n",
        "engine/__init__.py": "",
        "engine/process.py": "from ..decision.rules import rows\n",
        "engine/preprocess.py": "",
        "decision/__init__.py": "",
        "decision/rules.py": "",
        "decision/process.py": "from ..engine import preprocess\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    graph = import_graph(root)
    assert cycles(graph) == [["agent.capture.aravis", "agent.capture.sources"]]
    assert graph["agent.decision.process"] == {"agent.engine.preprocess"}
    assert cycles(subpackage_graph(graph)) == [["agent.decision", "agent.engine"]]
