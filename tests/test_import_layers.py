"""The package's layers (design.md): imports point down only, and no import cycle of any length.

Every ``import``/``from ... import`` in ``src/mola`` (module level and inside functions) is read with ``ast``.
Ranks, low to high: shared helpers (with ``mola.tasks``: TaskInfo, Scenario, plain types that models and metrics
name) < layers < models (inject, export) < methods < data < engine < analysis / task_inference < cli. A module
may import its own rank or lower. Importing ``a.b.c`` runs the packages ``a`` and ``a.b`` first, so a module's
imports include the ``__init__`` of every package above what it names; a cycle through those counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

RANKS: list[tuple[str, ...]] = [
    ("mola._version", "mola.registry", "mola.config_utils", "mola.files", "mola.tasks"),
    ("mola.layers",),
    ("mola.inject", "mola.models", "mola.export"),
    ("mola.methods",),
    ("mola.data", "mola.metrics"),
    ("mola.engine",),
    ("mola.analysis", "mola.task_inference"),
    ("mola.cli",),
]


def rank_of(module: str) -> int:
    """The rank of the longest matching prefix; ``mola`` itself (the public face) is above everything."""
    best, length = len(RANKS), 0
    for r, prefixes in enumerate(RANKS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > length:
                best, length = r, len(p)
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The mola modules ``path`` imports (``from a import b`` counts as ``a.b`` when that is a module)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m == "mola" or m.startswith("mola.")} - {me}


def graph() -> dict[str, set[str]]:
    files = sorted((SRC / "mola").rglob("*.py"))
    known = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, known) for f in files}


def upward(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in g.items() for d in deps
                  if m != "mola" and rank_of(d) > rank_of(m))


def with_parents(g: dict[str, set[str]]) -> dict[str, set[str]]:
    """``g`` with each import of ``mola.a.b`` also running the package ``mola.a`` (its ``__init__``), as Python
    does; ``mola`` itself (the public face, importing everything) and a module's own packages are left out."""
    out: dict[str, set[str]] = {}
    for m, deps in g.items():
        full = set(deps)
        for d in deps:
            parts = d.split(".")
            full |= {".".join(parts[:i]) for i in range(2, len(parts))}
        out[m] = {d for d in full if d in g and d != m and not m.startswith(d + ".")}
    return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``g``: each strongly connected component of two or more modules, sorted (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return sorted(found)


def test_imports_point_down_only() -> None:
    g = graph()
    assert len(g) > 50 and "mola.engine.trainer" in g  # the walk found the package
    assert not upward(g), "lower layers import higher ones:\n" + "\n".join(upward(g))


def test_no_import_cycle() -> None:
    found = cycles(with_parents(graph()))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_checker_catches_an_upward_and_a_mutual_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rules fire on planted violations: engine importing the CLI; a two-module and a three-module cycle; a
    cycle through a package ``__init__``."""
    g = graph()
    g["mola.engine.trainer"] = g["mola.engine.trainer"] | {"mola.cli.report"}
    g["mola.engine.run"] = g["mola.engine.run"] | {"mola.engine.trainer"}
    g["mola.engine.trainer"] |= {"mola.engine.run"}
    assert upward(g) == ["mola.engine.trainer -> mola.cli.report"]
    assert cycles(g) == [["mola.engine.run", "mola.engine.trainer"]]
    three = {"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "a.w": {"a.x"}}
    assert cycles(three) == [["a.x", "a.y", "a.z"]]
    via_init = {"m.p": {"m.p.q"}, "m.p.q": set(), "m.r": {"m.p.q"}, "m.p.s": {"m.r"}}  # m.p runs m.p.q: fine
    assert cycles(with_parents(via_init)) == []
    via_init["m.p"] = {"m.p.s"}  # m.p -> m.p.s -> m.r -> m.p.q, which runs the package m.p first
    assert cycles(with_parents(via_init)) == [["m.p", "m.p.s", "m.r"]]
    pkg = tmp_path / "mola"
    (pkg / "layers").mkdir(parents=True)
    (pkg / "layers" / "x.py").write_text("def f():\n    from ..engine import trainer\n")
    monkeypatch.setattr(f"{__name__}.SRC", tmp_path)
    assert imports_of(pkg / "layers" / "x.py", {"mola.engine.trainer"}) == {"mola.engine.trainer"}
