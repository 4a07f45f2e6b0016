"""``mola train --dry-run`` reads the real data of every data kind: a missing folder exits 2 naming it and saying
where the shipped data is expected; it takes no run lock and needs no free ``--out``."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

import mola.data.layouts  # noqa: F401  (registers every kind)
from fixtures_data import make_task_folders
from mola.cli.main import main
from mola.data.registry import SCENARIOS

KINDS = SCENARIOS.names()


def test_every_builtin_kind_is_covered() -> None:
    assert {"tasks", "folder", "radimagenet", "nyuv2", "medmnist", "medmnist9", "vlcs", "digits"} <= set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_dry_run_on_a_missing_folder_exits_2_naming_it(kind: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no_such_data"
    code = main(["train", "--dry-run", f"data.kind={kind}", f"data.root={missing}", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(missing) in err and "shared/data" in err and "data.root=PATH" in err
    assert not (tmp_path / "r").exists()


def test_dry_run_of_a_paper_kind_reads_the_folder_and_synthetic_needs_none(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = make_task_folders(tmp_path / "rad")
    assert main(["train", "--dry-run", "data.kind=radimagenet", f"data.root={root}", "data.image_size=16",
                 "model.backbone.name=small_cnn"]) == 0
    out = capsys.readouterr().out
    assert "colors: 3 classes" in out and "task0" not in out  # the real tasks, not made-up ones
    assert main(["train", "--dry-run", "--synthetic", "data.kind=radimagenet", f"data.root={tmp_path / 'none'}",
                 "model.backbone.name=small_cnn", "data.image_size=16"]) == 0
    assert "synthetic stand-in of radimagenet" in capsys.readouterr().out


def test_dry_run_takes_no_lock_and_reports_a_used_run_folder(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    root = make_task_folders(tmp_path / "mine")
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.pt").write_bytes(b"x")
    (out / ".mola.lock").write_text(f"{os.getppid()} {socket.gethostname()}\n")  # a live process owns it
    args = ["train", "--dry-run", "--out", str(out), "data.kind=tasks", f"data.root={root}",
            "model.backbone.name=small_cnn", "--method", "mola_router"]
    assert main(args) == 0, capsys.readouterr().err
    assert "holds a run: training needs --resume" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [".mola.lock", "checkpoints"]  # nothing written
