"""The package's layers (design.md): imports point down only, and no two modules import each other.

Every ``import``/``from ... import`` in ``src/mola`` (module level and inside functions) is read with ``ast``.
Ranks, low to high: shared helpers < layers < models (inject, export) < methods < data < engine
< analysis / task_inference < cli. ``mola.data.base`` (TaskInfo, Scenario: plain types) sits with the helpers,
as models and metrics name those types. A module may import its own rank or lower.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

RANKS: list[tuple[str, ...]] = [
    ("mola._version", "mola.registry", "mola.config_utils", "mola.files", "mola.data.base"),
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


def mutual(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} <-> {b}" for a, deps in g.items() for b in deps if a < b and a in g.get(b, set()))


def test_imports_point_down_only() -> None:
    g = graph()
    assert len(g) > 50 and "mola.engine.trainer" in g  # the walk found the package
    assert not upward(g), "lower layers import higher ones:\n" + "\n".join(upward(g))


def test_no_two_modules_import_each_other() -> None:
    assert not mutual(graph()), "modules importing each other:\n" + "\n".join(mutual(graph()))


def test_the_checker_catches_an_upward_and_a_mutual_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rules fire on a planted violation (engine importing the CLI; two modules importing each other)."""
    g = graph()
    g["mola.engine.trainer"] = g["mola.engine.trainer"] | {"mola.cli.report"}
    g["mola.engine.run"] = g["mola.engine.run"] | {"mola.engine.trainer"}
    g["mola.engine.trainer"] |= {"mola.engine.run"}
    assert upward(g) == ["mola.engine.trainer -> mola.cli.report"]
    assert mutual(g) == ["mola.engine.run <-> mola.engine.trainer"]
    pkg = tmp_path / "mola"
    (pkg / "layers").mkdir(parents=True)
    (pkg / "layers" / "x.py").write_text("def f():\n    from ..engine import trainer\n")
    monkeypatch.setattr(f"{__name__}.SRC", tmp_path)
    assert imports_of(pkg / "layers" / "x.py", {"mola.engine.trainer"}) == {"mola.engine.trainer"}
