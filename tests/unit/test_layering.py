"""The house's floors, read from the source: data_pipeline/ → pretrain/ → launch/, and no import circles.

Every ``import`` and ``from ... import`` in every module counts, also those inside functions: a circle that only
closes at call time is still two modules that cannot be understood (or moved) one without the other. Importing
``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` first, so it depends on those packages too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("data_pipeline", "launch", "pretrain")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def _imported_names(path: Path, name: str) -> set[str]:
    """Every dotted name ``path`` (module ``name``) imports, ``from x import y`` giving both x and x.y."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """{module: project modules it imports}, with the packages above each imported module."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imported_names(path, name):
            parts = imported.split(".")
            for i in range(1, len(parts) + 1):  # a.b.c runs a and a.b first
                candidate = ".".join(parts[:i])
                if candidate in modules:
                    targets.add(candidate)
        targets.discard(name)
        # A module's own parent packages run before it; a package importing its parent is no circle of note.
        graph[name] = {t for t in targets if not name.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, colours white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_the_imports_it_must():
    graph = import_graph()
    assert "pretrain.config" in graph["pretrain.train"]  # a plain `from pretrain.config import ...`
    assert len(graph) > 50


def test_no_import_cycle_among_project_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_reports_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_launch_sits_on_top():
    offenders = sorted(f"{module} imports {target}" for module, targets in import_graph().items()
                       if not module.startswith("launch") for target in targets if target.startswith("launch"))
    assert not offenders, offenders


def test_data_pipeline_never_imports_pretrain():
    offenders = sorted(f"{module} imports {target}" for module, targets in import_graph().items()
                       if module.startswith("data_pipeline") for target in targets
                       if target.startswith("pretrain"))
    assert not offenders, offenders


def test_only_the_device_layer_asks_whether_cuda_is_there():
    """CPU-vs-CUDA decisions go through pretrain/device.py (``cuda_available()`` or a ``DeviceInfo``), so that
    docs/cpu_and_gpu.md can say where they are made, and the CPU test tier reaches every one of them."""
    askers = sorted(str(path.relative_to(REPO)) for path in _modules().values()
                    if "cuda.is_available(" in path.read_text() and path.name != "device.py")
    assert not askers, askers
