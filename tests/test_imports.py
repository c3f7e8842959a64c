"""The library's import structure: no import cycles between its modules (counting imports inside
functions too), `offside/` never imports Ray, and the method names the command line offers without
importing torch are the registered methods."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Cycles another change removes; each entry is one cycle's modules, sorted.
KNOWN_CYCLES: list[list[str]] = [["offside.models.loading", "offside.registry"]]
# The façade of the Python API, not structure: the root package (its `__version__`, and the stage
# functions it loads lazily from offside/api.py) and the unlearning-methods package, which answers
# `offside.unlearn(...)` by calling the API's function of that name.
FACADE = {"offside"}
FACADE_EDGES = {("offside.unlearn", "offside.api")}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in (ROOT / "offside").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every offside module `path` imports, at any depth of the file (module level or in a function)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return {n for n in names if n in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_in_the_library():
    modules = _modules()
    graph = {name: {n for n in _imports(path, modules) - {name} - FACADE if (name, n) not in FACADE_EDGES}
             for name, path in modules.items() if name not in FACADE}
    assert "offside.eval.image_attacks" in graph["offside.eval.attacks"]  # the check sees function-level imports too
    assert [c for c in _cycles(graph) if c not in KNOWN_CYCLES] == []


def test_the_library_never_imports_ray():
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n == "ray" or n.startswith("ray.")], path


def test_the_method_names_offered_without_torch_are_the_registered_methods():
    from offside.configs import method_names
    from offside.unlearn import available

    assert method_names() == available() and "npo" in method_names()
