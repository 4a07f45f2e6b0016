"""Paths and command lines that work from any folder: a config's relative data.root is relative to the config,
``--config NAME`` finds a shipped config, overrides stand anywhere on the line, a missing data root says where
the shipped data is expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures_data import make_task_folders
from mola.cli.main import main, parse_args
from mola.engine import load_config

REPO = Path(__file__).resolve().parents[1]


def test_override_after_an_option_is_applied(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_args(["train", "--config", "demo", "--out", "D", "train.epochs=2", "--seed", "3", "data.batch_size=7"])
    assert args.out == "D" and args.seed == 3 and args.overrides == ["train.epochs=2", "data.batch_size=7"]
    root = make_task_folders(tmp_path / "mine")
    assert main(["train", "--dry-run", "--out", str(tmp_path / "r"), "train.epochs=2", "--config", "demo",
                 "data.kind=tasks", f"data.root={root}", "--method", "mola_router", "data.batch_size=7"]) == 0
    text = capsys.readouterr().out
    assert "epochs: 2" in text and "batch_size: 7" in text and "mode: router" in text
    with pytest.raises(SystemExit):
        parse_args(["train", "--config", "demo", "--bogus"])
    with pytest.raises(SystemExit):
        parse_args(["list", "train.epochs=2"])  # list takes no overrides


def test_shipped_config_by_name_from_another_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config("demo")
    assert cfg.name == "demo_medmnist_grad"
    assert Path(cfg.data.root).resolve() == (REPO.parent / "shared" / "data" / "medmnist").resolve()
    assert load_config("paper/vlcs_grad").data.kind == "vlcs"
    assert load_config("configs/demo.yaml").name == cfg.name  # the README's path form, from another folder
    from mola.cli.sweep import load_sweep, plan_sweep

    spec = load_sweep("medmnist_compare", ["grid.seed=[0]", f"out_dir={tmp_path / 'sw'}"])
    assert spec.base.is_file() and [r.name for r in plan_sweep(spec)][-1] == "mola_router-s0"
    assert load_config("medmnist_grad.yaml").name == load_config(REPO / "configs" / "medmnist_grad.yaml").name
    with pytest.raises(FileNotFoundError, match=r"Did you mean .*demo"):
        load_config("demoo")
    assert main(["list"]) == 0
    assert "demo, digits_grad" in capsys.readouterr().out


def test_relative_root_is_relative_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_task_folders(tmp_path / "project" / "data" / "mine")
    (tmp_path / "project" / "configs").mkdir()
    cfg_file = tmp_path / "project" / "configs" / "mine.yaml"
    cfg_file.write_text("data: {kind: tasks, root: ../data/mine}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(cfg_file)
    assert Path(cfg.data.root) == (tmp_path / "project" / "data" / "mine").resolve()
    assert load_config(cfg_file, ["data.root=here"]).data.root == "here"  # the command line: the working folder
    monkeypatch.chdir(tmp_path)  # an older config whose root exists only relative to the working folder
    (tmp_path / "old.yaml").write_text("data: {kind: tasks, root: project/data/mine}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "old.yaml").write_text("data: {kind: tasks, root: project/data/mine}\n")
    assert load_config(tmp_path / "sub" / "old.yaml").data.root == "project/data/mine"


def test_missing_data_root_says_where_the_shipped_data_goes(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--config", "demo", f"data.root={tmp_path / 'gone'}", "train.epochs=1",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "gone") in err and str(REPO.parent / "shared" / "data") in err
    assert "data.root=PATH" in err and "data.kind=tasks" in err
