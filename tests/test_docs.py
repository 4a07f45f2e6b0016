"""The docs cannot rot: every code block marked runnable is executed, generated blocks match the code.

A block is runnable when the line just before its opening fence is ``<!-- runnable -->``. All runnable blocks of
one page run in order: Python blocks in one shared namespace, shell blocks with ``bash -euo pipefail``, in a
temporary working folder that has ``configs/`` (a link to the repository's) and ``../shared`` (a link to the
shipped data), so the commands and paths of the docs work as written.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mola.cli import reference

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MARK = "<!-- runnable -->"
FENCE = re.compile(r"^```(\w*)")
LANGS = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}


def doc_pages() -> list[Path]:
    """README.md and every Markdown page under docs/."""
    return [REPO / "README.md"] + sorted((REPO / "docs").rglob("*.md"))


def runnable_blocks(path: Path) -> list[tuple[str, str, int]]:
    """(language, code, line of the opening fence) of each marked block; a mark on anything else is an error."""
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.strip() != MARK:
            continue
        m = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if m is None or LANGS.get(m.group(1)) is None:
            raise AssertionError(f"{path}:{i + 1}: {MARK} must be followed by a ```python or ```bash fence")
        end = next((j for j in range(i + 2, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise AssertionError(f"{path}:{i + 2}: unclosed code block")
        out.append((LANGS[m.group(1)], "\n".join(lines[i + 2:end]) + "\n", i + 2))
    return out


PAGES = [p for p in doc_pages() if runnable_blocks(p)]


def _needs_shared(blocks: list[tuple[str, str, int]]) -> bool:
    return any("configs/" in code or "shared/data" in code for _, code, _ in blocks)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_runnable_blocks(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = runnable_blocks(page)
    if _needs_shared(blocks) and not (SHARED / "data").is_dir():
        pytest.skip("the page uses the shipped data, which is not next to this checkout")
    work = tmp_path / "work"
    work.mkdir()
    (work / "configs").symlink_to(REPO / "configs")
    if SHARED.is_dir():
        (tmp_path / "shared").symlink_to(SHARED)
    monkeypatch.chdir(work)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for lang, code, line in blocks:
        where = f"{page.relative_to(REPO)}:{line}"
        if lang == "python":
            exec(compile(code, where, "exec"), namespace)  # noqa: S102 - the docs' own code
        else:
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=work, env=env, capture_output=True,
                                  text=True, timeout=300)
            assert proc.returncode == 0, f"{where} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"


def test_pages_have_runnable_blocks() -> None:
    """The guides keep their runnable examples (a page losing all of them is a mistake, not a cleanup)."""
    names = {str(p.relative_to(REPO)) for p in PAGES}
    for page in ("README.md", "docs/quickstart.md", "docs/concepts.md", "docs/data.md", "docs/own_model.md"):
        assert page in names, f"{page} has no block marked {MARK}"


def test_reference_is_up_to_date() -> None:
    stale = reference.stale()
    assert not stale, (f"generated docs are out of date: {[str(p) for p in stale]}; regenerate them with "
                       f"`{reference.REGENERATE}`")


def test_every_config_key_has_help() -> None:
    """Config dataclasses are the single source of the reference: each field carries its help in the code."""
    missing = reference.missing_help()
    assert not missing, (f"config fields without help: {missing}; add a trailing `# help` comment (or `#:` lines "
                         f"above the field), then run `{reference.REGENERATE}`")


def test_generated_blocks_render() -> None:
    assert "| `model.mola.rank` |" in reference.render_block("config", "model.mola")
    assert "model.options.num_experts" in reference.render_block("arch", "mmoe")
    assert "train.weighting_options.c" in reference.render_block("weighting", "cagrad")
    assert "train.method_options.lam" in reference.render_block("method", "dann")
    assert "--checkpoint" in reference.render_block("cli", "eval")
    with pytest.raises(ValueError, match="unknown generated block kind"):
        reference.render_block("nope", "x")


def test_reference_cli_prints_the_page(capsys: pytest.CaptureFixture[str]) -> None:
    """The printed page names every config key (read from the dataclasses here) and every subcommand."""
    import dataclasses

    from mola.cli.main import build_parser
    from mola.engine.config import RunConfig

    assert reference.main([]) == 0
    out = capsys.readouterr().out

    def keys(obj: object, prefix: str = "") -> list[str]:
        found = []
        for f in dataclasses.fields(obj):  # type: ignore[arg-type]
            value = getattr(obj, f.name)
            found += keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]
        return found

    assert len(keys(RunConfig())) > 40
    missing = [k for k in keys(RunConfig()) if f"| `{k}` |" not in out]
    assert not missing, missing
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert all(f"### `mola {c}`" in out for c in commands)


LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
OTHER_PAGES = {"reliability.md", "distributed.md", "deployment.md"}  # written alongside, linked from the index


def test_relative_links_resolve() -> None:
    broken = []
    for page in doc_pages():
        for target in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = (page.parent / target).resolve()
            if not path.exists() and not (path.name in OTHER_PAGES and path.parent == REPO / "docs"):
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, f"broken links: {broken}"


def test_field_help_sources() -> None:
    import dataclasses

    @dataclasses.dataclass
    class Example:
        a: int = 1  # trailing comment
        #: comment line above
        b: int = 2
        c: int = 3
        """attribute docstring"""
        d: int = dataclasses.field(default=4, metadata={"help": "from metadata"})
        e: int = 5

    assert reference.field_help(Example) == {"a": "trailing comment", "b": "comment line above",
                                             "c": "attribute docstring", "d": "from metadata", "e": ""}


def test_docstrings_cite_docs_pages_that_exist() -> None:
    """Every ``docs/<page>.md`` a module of src/mola cites exists in this repository (and none cites a file
    outside it, such as the design notes' method.md)."""
    src = REPO / "src" / "mola"
    cited = {m for f in src.rglob("*.py") for m in re.findall(r"docs/[\w/.-]+?\.md", f.read_text())}
    assert cited, "no docs/ citation found"
    missing = sorted(c for c in cited if not (REPO / c).is_file())
    assert not missing, f"cited pages that do not exist: {missing}"
    assert not [f for f in src.rglob("*.py") if "method.md" in f.read_text()]
