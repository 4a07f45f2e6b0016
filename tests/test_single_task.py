"""`--arch single_task` as the paper runs it: one separate run per task, equal to running each task alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mola.cli.main import main
from mola.engine import fit_single_task, load_config
from mola.engine.checkpoint import checkpoint_path, load_checkpoint

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OFFICE = SHARED / "office_caltech10"
DOMAINS = ["amazon", "dslr", "webcam"]


def _overrides(extra: list[str] = ()) -> list[str]:
    if not OFFICE.is_dir():
        pytest.skip("shipped Office-Caltech10 data not found")
    return [f"data.root={OFFICE}", "data.kind=office_caltech10", f"data.domains=[{','.join(DOMAINS)}]",
            "data.batch_size=32", "model.backbone.name=mlp", "model.backbone.width=8", "train.epochs=2",
            "train.max_steps_per_epoch=4", "train.progress=false", "train.tensorboard=false", "train.seed=3",
            "optim.lr=0.01", *extra]


def test_single_task_equals_separate_one_task_runs(tmp_path: Path) -> None:
    cfg = load_config(None, _overrides(["model.arch=single_task"]))
    final = fit_single_task(cfg, tmp_path / "st")
    assert list(final["test"]) == DOMAINS and set(final["best_epoch"]) == set(DOMAINS)
    assert final["arch"] == "single_task" and (tmp_path / "st" / "metrics.csv").is_file()
    for d in DOMAINS:  # the same as `mola train` on that domain alone, with the joint arch's one network
        alone = tmp_path / f"alone-{d}"
        assert main(["train", "--out", str(alone), *_overrides(["model.arch=single_task_joint",
                                                                f"data.domains=[{d}]", "data.channels=800"])]) == 0
        mine = load_checkpoint(checkpoint_path(tmp_path / "st" / "tasks" / d, "best"))["model"]
        ref = load_checkpoint(checkpoint_path(alone, "best"))["model"]
        assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
        ref_final = json.loads((alone / "final.json").read_text())
        assert final["test"][d] == pytest.approx(ref_final["test"][d], abs=1e-6)
        assert final["best_epoch"][d] == ref_final["best_epoch"]
    # the parameter count is the sum of the per-task networks; the joint variant trains something else
    joint = load_config(None, _overrides(["model.arch=single_task_joint"]))
    assert main(["train", "--out", str(tmp_path / "joint"), *_overrides(["model.arch=single_task_joint"])]) == 0
    jfinal = json.loads((tmp_path / "joint" / "final.json").read_text())
    assert final["parameters"]["total"] == jfinal["parameters"]["total"]
    assert joint.model.arch == "single_task_joint" and final["test"] != jfinal["test"]


def test_single_task_run_reuses_finished_tasks_and_refuses_trainer(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    over = _overrides(["model.arch=single_task", "train.epochs=1", "train.max_steps_per_epoch=2"])
    assert main(["train", "--out", str(tmp_path / "st"), *over]) == 0
    first = json.loads((tmp_path / "st" / "final.json").read_text())
    (tmp_path / "st" / "final.json").unlink()
    # without --resume the folder is refused; with it, finished sub-runs are reused as they are
    assert main(["train", "--out", str(tmp_path / "st"), *over]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "st"), "--resume", *over]) == 0
    assert "already finished" in capsys.readouterr().err
    assert json.loads((tmp_path / "st" / "final.json").read_text())["test"] == first["test"]
    # another config for a finished sub-run is refused
    assert main(["train", "--out", str(tmp_path / "st"), "--resume", *over, "optim.lr=0.5"]) == 2
    assert "finished with another config" in capsys.readouterr().err
    # eval on the run folder names its per-task runs; eval on one of them works
    assert main(["eval", "--checkpoint", str(tmp_path / "st")]) == 2
    err = capsys.readouterr().err
    assert "is a single_task run" in err and str(tmp_path / "st" / "tasks") in err
    task = sorted(p.name for p in (tmp_path / "st" / "tasks").iterdir())[0]
    assert main(["eval", "--checkpoint", str(tmp_path / "st" / "tasks" / task), "--split", "val"]) == 0
    assert task in capsys.readouterr().out
    from mola.engine import Trainer

    with pytest.raises(ValueError, match="one separate run per task"):
        Trainer(load_config(None, over), tmp_path / "x")


def test_sweep_in_process_runs_single_task_as_separate_runs(tmp_path: Path) -> None:
    over = [o for o in _overrides(["train.epochs=1", "train.max_steps_per_epoch=2"]) if "domains" not in o]
    base = tmp_path / "base.yaml"
    base.write_text("name: base\n")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"base": str(base), "out_dir": str(tmp_path / "out"),
                                     "grid": {"arch": ["single_task"], "seed": [0]},
                                     "overrides": {"fixed": [{"tiny": [*over, "data.domains=[amazon,dslr]"]}]}}))
    assert main(["sweep", "--config", str(sweep), "--no-progress"]) == 0
    run = next((tmp_path / "out").glob("single_task*"))
    final = json.loads((run / "final.json").read_text())
    assert final["arch"] == "single_task" and sorted(final["test"]) == ["amazon", "dslr"]
    assert (run / "tasks" / "amazon" / "final.json").is_file() and (run / "tasks" / "dslr" / "final.json").is_file()


def test_single_task_resume_checks_everything_before_writing_and_continues_with_more_epochs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    over = _overrides(["model.arch=single_task", "train.epochs=1", "train.max_steps_per_epoch=2"])
    run = tmp_path / "st"
    assert main(["train", "--out", str(run), *over]) == 0
    config = (run / "config.yaml").read_bytes()
    # a refused resume (another data config) leaves config.yaml as it was
    assert main(["train", "--out", str(run), "--resume", *over, "data.max_per_task=5"]) == 2
    assert "data.max_per_task: None -> 5" in capsys.readouterr().err
    assert (run / "config.yaml").read_bytes() == config
    # an unfinished sub-run (finished siblings after it): its data/model check comes before any write too
    (run / "final.json").unlink()
    (run / "tasks" / DOMAINS[0] / "final.json").unlink()
    assert main(["train", "--out", str(run), "--resume", *over, "data.max_per_task=5"]) == 2
    assert "trained with another data/model config" in capsys.readouterr().err
    assert (run / "config.yaml").read_bytes() == config
    # more epochs: every sub-run is continued from its checkpoint to the new length
    with pytest.warns(RuntimeWarning, match="train.epochs 1 -> 2: the run now ends at epoch 2"):
        assert main(["train", "--out", str(run), "--resume", *over, "train.epochs=2"]) == 0
    final = json.loads((run / "final.json").read_text())
    assert final["epochs"] == 2 and yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 2
    for d in DOMAINS:
        assert json.loads((run / "tasks" / d / "final.json").read_text())["epochs"] == 2
        assert load_checkpoint(checkpoint_path(run / "tasks" / d, "last"))["epoch"] == 2
    # fewer epochs than trained: refused, nothing rewritten
    config = (run / "config.yaml").read_bytes()
    assert main(["train", "--out", str(run), "--resume", *over, "train.epochs=1"]) == 2
    assert "would throw trained epochs away" in capsys.readouterr().err
    assert (run / "config.yaml").read_bytes() == config
