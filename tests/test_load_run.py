"""``load_run``: the one loader of trained runs (eval, analyze, predict, export, the Trainer's final evaluation)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fixtures_runs import train_tiny_run
from mola.cli.main import main
from mola.engine import load_run
from mola.engine.checkpoint import checkpoint_path, load_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("load_run"), "mola_grad")


def test_load_run_reads_the_checkpoint_without_loaders_or_optimizer(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_run built a data loader or an optimizer")

    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", refuse)
    monkeypatch.setattr(torch.optim.Optimizer, "__init__", refuse)
    loaded = load_run(run, "last")
    state = load_checkpoint(checkpoint_path(run, "last"))["model"]
    assert loaded.path == checkpoint_path(run, "last") and loaded.run_dir == run
    assert not loaded.model.training
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert Path(loaded.cfg.data.root).is_absolute()  # stored absolute by training
    assert loaded.task_names == ["bright", "dark"]
    with pytest.raises(ValueError, match="only accepts data.root"):
        load_run(run, overrides=["model.mola.rank=8"])


def test_eval_after_the_data_moved_names_the_source_and_takes_an_override(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    moved = tmp_path / "copy"
    shutil.copytree(run, moved / "run")
    old_root = Path(load_run(run).cfg.data.root)
    cfg_file = moved / "run" / "config.yaml"  # a run whose data folder no longer exists
    ckpt = load_checkpoint(checkpoint_path(moved / "run", "best"))
    gone = tmp_path / "gone"
    ckpt["config"]["data"]["root"] = str(gone)
    from mola.engine.checkpoint import save_checkpoint

    save_checkpoint({k: v for k, v in ckpt.items() if k != "path"}, moved / "run", "best")
    cfg_file.write_text(cfg_file.read_text().replace(str(old_root), str(gone)))
    assert main(["eval", "--checkpoint", str(moved / "run"), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert str(gone) in err and "stored in the run's config" in err and "data.root=PATH" in err
    out = tmp_path / "metrics.json"
    assert main(["eval", "--checkpoint", str(moved / "run"), "--split", "test", "--output", str(out),
                 f"data.root={old_root}"]) == 0
    assert "batch/s" not in capsys.readouterr().err  # no progress bar when stderr is not a terminal
    got = json.loads(out.read_text())["test"]
    final = json.loads((run / "final.json").read_text())["test"]  # the Trainer's own evaluation of best
    for task, metrics in final.items():
        for name, value in metrics.items():
            assert got[task][name] == pytest.approx(value, abs=1e-6), (task, name)
    assert main(["eval", "--checkpoint", str(moved / "run"), f"data.root={tmp_path / 'nowhere'}"]) == 2
    assert "given on the command line" in capsys.readouterr().err


def test_checkpoint_typo_names_the_path_given(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    typo = run / "checkpoints" / "bset.safetensors"
    assert main(["eval", "--checkpoint", str(typo)]) == 2
    err = capsys.readouterr().err
    assert f"{typo} does not exist" in err and "best.safetensors" in err  # lists what the folder holds
    assert "bset.safetensors/checkpoints" not in err
    assert main(["eval", "--checkpoint", str(run / "checkpoints")]) == 2
    assert "is not a mola run directory" in capsys.readouterr().err
