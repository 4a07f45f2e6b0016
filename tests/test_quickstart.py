"""docs/quickstart.md, run end to end: its Python blocks and every ``mola`` command of its shell blocks, in page
order, at tiny settings (1 epoch, a few images per task, a narrow network), from a scratch folder laid out like a
checkout. The reader's own 3-task folder is the one the page builds."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mola.cli.main import main

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "quickstart.md"
SHARED = REPO.parent / "shared"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
TINY = ["train.epochs=1", "data.max_per_task=12", "data.max_eval_per_task=8", "data.batch_size=16",
        "data.eval_batch_size=64", "model.backbone.width=4", "train.progress=false", "train.tensorboard=false"]


def page_steps() -> list[tuple[str, str | list[str]]]:
    """("python", code) and ("mola", argv) in page order; other shell commands (pip, pytest) are skipped."""
    text = PAGE.read_text()
    steps: list[tuple[str, str | list[str]]] = []
    for block in FENCE.finditer(text):
        lang, body = block.group(1), block.group(2)
        if lang == "python":
            steps.append(("python", body))
        elif lang in ("bash", "sh", ""):
            for line in re.sub(r"\\\n\s*", " ", body).splitlines():
                for part in re.split(r"&&|;", line):
                    argv = shlex.split(part, comments=True)
                    if argv[:1] == ["mola"] and len(argv) > 1:
                        steps.append(("mola", argv[1:]))
    return steps


def tiny(argv: list[str]) -> list[str]:
    """The command at tiny settings: runs get TINY overrides; a sweep runs in this process."""
    argv = [a.replace("/path/to/medmnist", str(SHARED / "data" / "medmnist")) for a in argv]
    if argv[0] == "train":
        return [*argv, *TINY]
    if argv[0] == "sweep":
        if "--workers" in argv:
            i = argv.index("--workers")
            argv = argv[:i] + argv[i + 2:]
        return [*argv, "--no-progress", "grid.seed=[0]", *TINY, "train.max_steps_per_epoch=1"]
    return argv


def test_quickstart_page_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    if not (SHARED / "data" / "medmnist").is_dir():
        pytest.skip("the quick start uses the shipped MedMNIST data, which is not next to this checkout")
    work = tmp_path / "mola"
    work.mkdir()
    (work / "configs").symlink_to(REPO / "configs")
    (tmp_path / "shared").symlink_to(SHARED)
    monkeypatch.chdir(work)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    steps = page_steps()
    kinds = [s[1][0] for s in steps if s[0] == "mola"]
    assert {"train", "eval", "analyze", "sweep", "report", "list", "layers", "predict"} <= set(kinds), kinds
    namespace: dict[str, object] = {"__name__": "__quickstart__"}
    for kind, step in steps:
        if kind == "python":
            assert isinstance(step, str)
            exec(compile(step, str(PAGE), "exec"), namespace)  # noqa: S102 - the page's own code
            continue
        assert isinstance(step, list)
        code = main(tiny(step))
        captured = capsys.readouterr()
        assert code == 0, f"mola {' '.join(step)} exited {code}: {captured.err[-2000:]}"
        if step[:1] == ["train"] and "data.root=my_tasks" in step and "--dry-run" in step:
            for task, classes in (("colors", 3), ("shapes", 2), ("xray", 2)):
                assert f"  {task}: {classes} classes" in captured.out
            assert "input_shape: [3, " in captured.out and "RGB" in captured.out  # colour kept
    heads = (work / "runs" / "my_tasks" / "final.json").read_text()
    assert all(f'"{t}"' in heads for t in ("colors", "shapes", "xray"))
    preds = (work / "my_preds.csv").read_text().splitlines()
    assert preds[0].startswith("path,task") and len(preds) == 13 and all(",colors," in p for p in preds[1:])
    assert (work / "runs" / "medmnist_compare" / "sweep_summary.csv").is_file()
