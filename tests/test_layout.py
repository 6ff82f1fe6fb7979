"""The package's layout: no import cycles between its modules, and the core stays apart from
the RPC and benchmark code.

The import graph is read from the source (``ast``), every ``import`` counted wherever it stands:
at the top of a module or inside a function (a function-level import hides a cycle from Python's
import machinery, not from this test). ``python tests/test_layout.py`` prints the counts.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# package -> its source folder (pyproject.toml's package-dir)
PACKAGES = {"tvm_lite": ROOT / "tvm_lite", "tvm_lite.relax_passes": ROOT / "relax_passes",
            "tvm_lite.schedules": ROOT / "schedules", "tvm_lite.rpc": ROOT / "rpc"}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if any(name == other or name.startswith(other + ".") for other in PACKAGES
                   if other != package and other.startswith(package + ".")):
                continue  # a sub-package mapped elsewhere
            found[name] = path
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(mods: dict[str, Path]) -> list[tuple[str, str, bool, int]]:
    """(importer, imported module, at function level?, line) for every name imported."""
    edges = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        nested = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                nested.update(id(n) for n in ast.walk(node) if n is not node)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path.name == "__init__.py", node)
                # ``from pkg import mod`` imports the module pkg.mod, if it is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            else:
                continue
            for target in targets:
                edges.append((name, target, id(node) in nested, node.lineno))
    return edges


def package_edges(mods, edges) -> dict[str, set]:
    """importer -> the package's modules it imports (the longest known prefix of each name)."""
    graph = {m: set() for m in mods}
    for src, dst, *_ in edges:
        while dst and dst not in mods:
            dst = dst.rpartition(".")[0]
        if dst and dst != src and not src.startswith(dst + ".") and dst != "tvm_lite":
            graph[src].add(dst)
    return graph


def cycles(graph: dict[str, set]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# the compiler core and the engine: what a build or a generation needs
CORE = ("tvm_lite.frontend", "tvm_lite.relax_passes", "tvm_lite.pipeline", "tvm_lite.compiler",
        "tvm_lite.artifact", "tvm_lite.engine")
NOT_CORE = ("tvm_lite.rpc", "tvm_lite.bench", "tvm_lite.tune", "tvm_lite.cli")


def reachable(graph: dict[str, set], starts) -> set:
    seen, todo = set(), list(starts)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph[m]
    return seen


def test_no_import_cycles():
    mods = modules()
    found = cycles(package_edges(mods, imports(mods)))
    assert not found, f"import cycles between modules: {found}"


def test_core_imports_neither_rpc_nor_benchmarks():
    mods = modules()
    graph = package_edges(mods, imports(mods))
    core = [m for m in mods if m.startswith(CORE)]
    assert len(core) > 20
    bad = sorted(m for m in reachable(graph, core) if m.startswith(NOT_CORE))
    assert not bad, f"the core reaches {bad}"


if __name__ == "__main__":
    mods = modules()
    edges = imports(mods)
    statements = {(src, line, nested) for src, _, nested, line in edges}
    print(f"modules: {len(mods)}; import statements: {len(statements)}, function-level: "
          f"{sum(1 for s in statements if s[2])}")
    for comp in cycles(package_edges(mods, edges)):
        print("cycle:", " <-> ".join(comp))
