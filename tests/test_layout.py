"""The package layout: no graphred module imports another graphred module's underscore names, and the
modules of graphred import each other without cycles (module-level imports; deferred imports inside
functions count as well, since a cycle through them is still a tangle)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "graphred"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, source: str | None = None) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every graphred import in ``module``."""
    path = MODULES.get(module, ROOT / "x.py")
    tree = ast.parse(source if source is not None else path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "graphred"]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node, path.name == "__init__.py")
            if target.split(".")[0] != "graphred":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub, None, node.lineno) if sub in MODULES else (target, a.name, node.lineno))
    return out


def _private_imports(module: str, source: str | None = None) -> list[str]:
    return [f"{module}:{line} imports {name} from {target}" for target, name, line in _imports(module, source)
            if name is not None and name.startswith("_") and not name.startswith("__") and target != module]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for m in MODULES:
        deps = set()
        for target, _, _ in _imports(m):
            # importing a name from a package executes the package; the edge is to the package module
            while target and target not in MODULES:
                target = target.rsplit(".", 1)[0] if "." in target else ""
            if target and target != m and not m.startswith(target + "."):
                deps.add(target)
        graph[m] = deps
    return graph


def test_no_module_imports_another_modules_private_names():
    bad = [msg for m in sorted(MODULES) for msg in _private_imports(m)]
    assert not bad, "make these helpers public (graphred/fx_utils.py for graph helpers):\n" + "\n".join(bad)


def test_no_import_cycles_inside_graphred():
    cycles = _cycles(_import_graph())
    assert not cycles, f"import cycles: {cycles}"


def test_the_checks_catch_what_they_look_for():
    """The two checks above can fail: a private import and a two-module cycle are found."""
    src = "from .provenance import _helper, TEXT\nfrom graphred.fx_utils import node_shape\n" \
          "def f():\n    from ..passes.infra import _late\n"
    found = _private_imports("graphred.analysis.blocks", src)
    assert len(found) == 2 and "_helper from graphred.analysis.provenance" in found[0] and "_late" in found[1]
    assert _cycles({"x": {"y"}, "y": {"x"}, "z": {"x"}}) == [["x", "y"]]
    assert _cycles({"x": {"y"}, "y": set()}) == []
    graph = _import_graph()  # the real graph has edges: the check is not vacuous
    assert "graphred.fx_utils" in graph["graphred.analysis.provenance"]
    assert "graphred.analysis.provenance" in graph["graphred.analysis.blocks"]
    assert "graphred.analysis.blocks" not in graph["graphred.analysis.provenance"]
