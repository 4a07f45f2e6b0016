"""Every ``mola`` command shown in README.md and docs/ runs as written (docs/reference.md is generated).

``mola train`` and ``mola sweep`` run with ``--dry-run`` (config, names and data are checked, the data is read
and split, nothing is trained); ``mola list`` runs; the commands that need a trained run (eval, analyze, export,
predict, report) are parsed by the real argument parser, so every flag, choice and file name they use exists.
They run from a scratch folder laid out like a checkout (``configs/`` next to it, ``../shared/data``).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from fixtures_data import make_image_tree, make_task_folders
from mola.cli.main import build_parser, main

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SHELL = ("bash", "sh", "shell", "console", "")
PLACEHOLDER = "/path/to/"


def doc_commands() -> list[tuple[str, list[str]]]:
    """(page:line, argv after ``mola``) of every mola command in a shell block of the docs."""
    out = []
    for page in PAGES:
        if page.name == "reference.md":
            continue
        text = page.read_text()
        for block in FENCE.finditer(text):
            if block.group(1) not in SHELL:
                continue
            start = text[: block.start(2)].count("\n") + 1
            body = re.sub(r"\\\n\s*", " ", block.group(2))
            for i, line in enumerate(body.splitlines()):
                for part in re.split(r"&&|;|\bdo\b|\bthen\b", line):
                    if not (part.strip().startswith("mola ") or "mola.cli.main" in part):
                        continue
                    argv = shlex.split(part, comments=True)
                    if "mola.cli.main" in argv:  # torchrun ... -m mola.cli.main train ...
                        argv = ["mola", *argv[argv.index("mola.cli.main") + 1:]]
                    if argv[:1] == ["mola"] and len(argv) > 1:
                        out.append((f"{page.relative_to(REPO)}:{start + i}", argv[1:]))
    return out


COMMANDS = doc_commands()
SCENARIOS: dict[str, object] = {}


def test_the_docs_show_commands_of_every_kind() -> None:
    kinds = {argv[0] for _, argv in COMMANDS}
    assert {"train", "eval", "sweep", "report", "analyze", "export", "predict", "list"} <= kinds, kinds


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch working folder with configs/ and ../shared/data as in a fresh clone, and a folder dataset."""
    root = tmp_path_factory.mktemp("clone")
    work = root / "mola"
    work.mkdir()
    (work / "configs").symlink_to(REPO / "configs")
    (root / "shared").symlink_to(REPO.parent / "shared")
    make_image_tree(root / "folder_data", {"d0": {"a": 3, "b": 3}, "d1": {"a": 3, "b": 3}})
    make_task_folders(work / "my_tasks")  # the quick start's own multi-task folder
    return work


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_doc_command_runs(where: str, argv: list[str], checkout: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    import mola.data

    build = mola.data.build_scenario

    def cached(cfg: object) -> object:  # each data config is read once for all commands
        if repr(cfg) not in SCENARIOS:
            SCENARIOS[repr(cfg)] = build(cfg)
        return SCENARIOS[repr(cfg)]

    monkeypatch.setattr(mola.data, "build_scenario", cached)
    monkeypatch.chdir(checkout)
    folder = str(checkout.parent / "folder_data")  # stands in for the reader's own /path/to/... data
    argv = [re.sub(r"/path/to/[^\s]*", folder, a) for a in argv]
    if argv[0] in ("train", "sweep"):
        code = main([*argv, "--dry-run"])
        assert code == 0, f"{where}: mola {' '.join(argv)} failed: {capsys.readouterr().err}"
    elif argv[0] == "list":
        assert main(argv) == 0
    else:
        try:
            build_parser().parse_args(argv)
        except SystemExit as err:
            pytest.fail(f"{where}: mola {' '.join(argv)} does not parse ({err}): {capsys.readouterr().err}")
