"""No package-level import cycle inside ulcore: every import counts, at module top or inside a function (a
function-local import only hides a cycle from the interpreter, not from a reader)."""

from __future__ import annotations

import ast
from pathlib import Path

import ulcore

PACKAGE_ROOT = Path(ulcore.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """The node of the graph: `ulcore.train.loop` -> `ulcore.train`; a top-level module is its own node."""
    return ".".join(module.split(".")[:2])


def _is_unit(name: str) -> bool:
    """`ulcore.train` (a package) or `ulcore.storage` (a top-level module); not `ulcore` itself."""
    path = PACKAGE_ROOT.parent / name.replace(".", "/")
    return name.count(".") == 1 and (path.is_dir() or path.with_suffix(".py").is_file())


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every ulcore module named by an import anywhere in the file (relative imports resolved)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)  # `from ulcore import storage`
    return {name for name in found if name == "ulcore" or name.startswith("ulcore.")}


def package_graph() -> dict[str, set[str]]:
    """unit -> the other units it imports."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        module = _module_name(path)
        if module == "ulcore":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = graph.setdefault(_unit(module), set())
        edges.update(unit for unit in map(_unit, _imported(tree, module, path.name == "__init__.py"))
                     if unit != _unit(module) and _is_unit(unit))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_reports_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_inside_functions_and_relative_ones_count():
    source = "from . import losses\ndef f():\n    from ulcore.eval.fid import fid_from_stats\n    import ulcore.storage\n"
    found = _imported(ast.parse(source), "ulcore.diffusion.sampling", is_package=False)
    assert {"ulcore.diffusion.losses", "ulcore.eval.fid", "ulcore.storage"} <= found
    graph = package_graph()
    assert "ulcore.storage" in graph["ulcore.data"] and "ulcore.nets" in graph["ulcore.train"]


def test_ulcore_has_no_package_level_import_cycle():
    cycle = find_cycle(package_graph())
    assert cycle is None, "package-level import cycle: " + " -> ".join(cycle or [])
