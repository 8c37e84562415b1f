"""weightkit's own import graph, read from the source (ast over weightkit/**/*.py and kernels/*.py, which installs as
weightkit.kernels; nothing is imported):

* no cycle among module-level imports, and none through function-level (lazy) imports either: a lazy import that
  closes a circle hides the same tangle;
* no import, module-level or lazy, from a lower layer to a higher one. The layers follow the design
  (the design card, ARCHITECTURE.md: kernels and backends below the ops, the layers on the ops, optimizers and
  compressors on the layers, the tools on top):

      0  weightkit.native, .kernels               the compiled kernels' loader (weightkit._C); Triton kernels
      1  weightkit.backends, weightkit.backend     one folder per backend (host code of every op); the choice
      2  weightkit.ops                             one module per hot path: op, reference, autograd, checks
      3  weightkit.nn, weightkit.models, .data      layers (and K-SVD, nn/ksvd.py), model definitions, corpora
      4  weightkit.compress, weightkit.optim, .checkpoint
      5  weightkit (the package face), .integrations, .cli, .train, .benchreport, .__main__

  Imports within one layer are allowed (no cycle). Function-level imports of weightkit.kernels from the ops are the
  lazy kernel loads (Triton is imported when a Triton kernel first runs); they point down, so they pass anyway.

``import a.b.c`` and ``from a.b import c`` (c a submodule) count as an edge to a.b.c, ``from a.b import name`` to
a.b; the parent packages' __init__ modules that Python runs first are not edges (every package face would
otherwise sit in a cycle with its children).
"""

from __future__ import annotations

import ast
import os
from typing import Dict, Iterable, List, Set, Tuple

import pytest

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.join(CHECKOUT, "weightkit")
# packages that live outside weightkit/ and install under it (setup.py's package_dir)
MAPPED = {"weightkit.kernels": os.path.join(CHECKOUT, "kernels")}

LAYERS = {
    "weightkit.native": 0, "weightkit._C": 0, "weightkit.kernels": 0,
    "weightkit.backends": 1, "weightkit.backend": 1,
    "weightkit.ops": 2,
    "weightkit.nn": 3, "weightkit.models": 3, "weightkit.data": 3,
    "weightkit.compress": 4, "weightkit.optim": 4, "weightkit.checkpoint": 4, "weightkit.memory": 4,
    "weightkit": 5, "weightkit.integrations": 5, "weightkit.cli": 5, "weightkit.train": 5,
    "weightkit.benchreport": 5, "weightkit.__main__": 5,
}

Edge = Tuple[str, str, int]  # (importer, imported, line)


def module_files(root: str) -> Dict[str, Tuple[str, bool]]:
    """Dotted module name -> (path, is_package) for every .py file under ``root`` (a package folder)."""
    base = os.path.dirname(root)
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                parts = os.path.relpath(path, base)[:-3].split(os.sep)
                is_package = parts[-1] == "__init__"
                found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    if root == ROOT:
        for package, folder in MAPPED.items():
            for name, (path, is_package) in module_files(folder).items():
                found[package + name[len("kernels"):]] = (path, is_package)
    return found


def _targets(node: ast.AST, module: str, is_package: bool, modules: Iterable[str]) -> List[str]:
    modules = set(modules)
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        if node.level > 1:
            package = package[: -(node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if sub in modules else base)
    return out


def import_graph(root: str = ROOT) -> Tuple[List[Edge], List[Edge]]:
    """(module-level edges, function-level edges) between the modules under ``root``; imports of anything outside
    the package are dropped. Imports inside a function (at any depth) are function-level; everything else (the
    module body, class bodies, if/try blocks) runs on import and is module-level."""
    modules = module_files(root)
    top, lazy = [], []

    def visit(node, module, is_package, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _targets(child, module, is_package, modules):
                    if target in modules and target != module:
                        (lazy if in_function else top).append((module, target, child.lineno))
            visit(child, module, is_package, inside)

    for module, (path, is_package) in modules.items():
        with open(path, encoding="utf-8") as f:
            visit(ast.parse(f.read(), path), module, is_package, False)
    return top, lazy


def cycles(edges: Iterable[Edge]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    graph: Dict[str, Set[str]] = {}
    for a, b, _ in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found = []

    def strongconnect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def layer_of(module: str) -> int:
    """The layer of the longest LAYERS prefix of ``module`` (the package face ``weightkit`` is no prefix: a new
    top-level module must be placed)."""
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return LAYERS[prefix]
    if module == "weightkit":
        return LAYERS[module]
    raise KeyError(module)


def upward(edges: Iterable[Edge]) -> List[str]:
    return [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)}) at line {line}"
            for a, b, line in sorted(set(edges)) if layer_of(b) > layer_of(a)]


def test_every_module_has_a_layer():
    unplaced = []
    for module in module_files(ROOT):
        try:
            layer_of(module)
        except KeyError:
            unplaced.append(module)
    assert not unplaced, f"place these modules in a layer (LAYERS in tests/test_imports.py): {unplaced}"


def test_no_cycle_among_module_level_imports():
    top, _ = import_graph()
    assert len(top) > 50  # the graph was read: weightkit has dozens of intra-package imports
    assert cycles(top) == []


def test_no_cycle_through_lazy_imports():
    top, lazy = import_graph()
    found = cycles(top + lazy)
    assert found == [], "function-level imports close these cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_import_runs_up_the_layers():
    top, lazy = import_graph()
    assert upward(top) == [], "module-level imports against the layers"
    assert upward(lazy) == [], "function-level imports against the layers"


def test_the_graph_reader_finds_cycles_and_upward_imports(tmp_path):
    """The checks above on a made-up package: they must see relative imports, submodules named in ``from . import``,
    function-level imports, and tell the two kinds apart."""
    pkg = tmp_path / "weightkit"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "nn").mkdir()
    files = {
        "__init__.py": "from . import ops\nfrom .nn import layer\n",
        "ops/__init__.py": "from . import a\n",
        "ops/a.py": "import torch\nfrom .b import f\n",
        "ops/b.py": "def f():\n    from .a import g\n    from ..nn.layer import Layer\n",
        "nn/__init__.py": "",
        "nn/layer.py": "from ..ops import a\nfrom weightkit.ops.b import f\nclass Layer:\n    pass\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    top, lazy = import_graph(str(pkg))
    assert sorted((a, b) for a, b, _ in top) == [
        ("weightkit", "weightkit.nn.layer"), ("weightkit", "weightkit.ops"), ("weightkit.nn.layer", "weightkit.ops.a"),
        ("weightkit.nn.layer", "weightkit.ops.b"), ("weightkit.ops", "weightkit.ops.a"),
        ("weightkit.ops.a", "weightkit.ops.b")]
    assert sorted((a, b) for a, b, _ in lazy) == [("weightkit.ops.b", "weightkit.nn.layer"),
                                                  ("weightkit.ops.b", "weightkit.ops.a")]
    assert cycles(top) == []
    assert cycles(top + lazy) == [["weightkit.nn.layer", "weightkit.ops.a", "weightkit.ops.b"]]
    assert upward(top) == []
    assert upward(lazy) == ["weightkit.ops.b (layer 2) imports weightkit.nn.layer (layer 3) at line 3"]
    assert layer_of("weightkit") == 5 and layer_of("weightkit.ops.b") == 2
    with pytest.raises(KeyError):
        layer_of("weightkit.newmodule")  # unplaced, not silently in the face's layer
