"""The package layout: old import paths alias the moved modules, and no import cycles.

Pure Python (no kernel runs): reads ``src/bitstable`` with :mod:`ast`.
"""

import ast
import importlib
import pathlib

import pytest

import bitstable

SRC = pathlib.Path(bitstable.__file__).parent

#: old import path -> where the module lives now (aliases kept for one release)
MOVED = {
    "bitstable.batch_invariant": "bitstable.ops.batch_invariant",
    "bitstable.generate": "bitstable.integrations.generate",
    "bitstable.verify": "bitstable.cli.verify",
    "bitstable.bench": "bitstable.cli.bench",
    "bitstable.bench_ops": "bitstable.cli.bench_ops",
    "bitstable.bench_model": "bitstable.cli.bench_model",
    "bitstable.demo": "bitstable.cli.demo",
}


@pytest.mark.parametrize("old,new", sorted(MOVED.items()))
def test_old_import_path_is_the_moved_module(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = ("bitstable",) + path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str, root: pathlib.Path) -> bool:
    rel = pathlib.Path(*name.split(".")[1:])
    return (root / rel).with_suffix(".py").is_file() or (root / rel / "__init__.py").is_file()


def import_graph(root: pathlib.Path) -> dict:
    """{module: bitstable modules it imports when first imported} for the package at
    ``root``.  Module-level statements only: imports inside functions run later and cannot
    form a load cycle."""
    graph = {}
    for path in root.rglob("*.py"):
        name = _module_name(path, root)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                if not (target or "").startswith("bitstable"):
                    continue
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("bitstable"))
        graph[name] = {m for m in found if m != name and _is_module(m, root)}
    return graph


def find_cycle(graph: dict):
    """One import cycle of ``graph`` as a list of modules, or None.  A package importing
    its own submodules is no cycle (importing a submodule loads its parents first)."""
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open" and not m.startswith(n + "."):
                return path[path.index(n):] + [n]
            if n not in state:
                cycle = visit(n)
                if cycle:
                    return cycle
        path.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def test_no_import_cycles():
    graph = import_graph(SRC)
    assert "bitstable.attention.sdpa" in graph["bitstable.ops.batch_invariant"]  # the graph is read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_sees_a_cycle(tmp_path):
    """The checker itself: a module and one in a subpackage importing each other."""
    pkg = tmp_path / "bitstable"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import sub\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("from .. import a\n")
    graph = import_graph(pkg)
    assert graph["bitstable.a"] == {"bitstable.sub", "bitstable.sub.b"}
    assert graph["bitstable.sub.b"] == {"bitstable", "bitstable.a"}
    assert find_cycle(graph) is not None
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n")
    assert find_cycle(import_graph(pkg)) is None
