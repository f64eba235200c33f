"""The house's layers only look down: every import inside dit_lens (at module level or inside a function) goes
from a package to one of its own layer or a lower one, and no modules import each other in a loop."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "dit_lens"

#: From the ground up; a package may import its own layer's packages and lower ones. The face (the package's
#: __init__) and the apps stand above everything.
LAYERS = [
    {"version", "validate", "storage"},
    {"metrics", "model"},
    {"scale", "training", "testing"},
    {"trace"},
    {"sampling", "features"},
    {"views", "interventions"},
    {"inversion", "readouts", "optimize"},
    {"methods"},
    {"world"},
    {"study", "experiments", "accessors"},
    {"apps", "__init__"},
]
LAYER = {package: i for i, layer in enumerate(LAYERS) for package in layer}


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The dit_lens modules `name` imports anywhere in its code (a name imported from a package that is one of its
    submodules counts as that submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m in known and m != name}


def _runtime_nodes(tree: ast.AST):
    """Every node that runs: the bodies of ``if TYPE_CHECKING:`` (names for type checkers only) left out."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def package_of(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_every_package_has_a_layer(graph):
    assert {package_of(m) for m in graph} <= set(LAYER), sorted({package_of(m) for m in graph} - set(LAYER))


def test_imports_only_look_down(graph):
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                    if LAYER[package_of(t)] > LAYER[package_of(m)])
    assert upward == []


def test_no_modules_import_each_other_in_a_loop(graph):
    # Tarjan's strongly connected components; the face (dit_lens/__init__) and package faces re-export their
    # submodules, so an import *of a face* from below would close a loop: none may exist.
    index, low, stack, on, loops, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert loops == []
