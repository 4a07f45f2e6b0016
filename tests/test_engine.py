"""Engine: configs, a short real training run, exact resume, losses, final.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mola.data.base import TaskInfo
from mola.engine import Trainer, load_config
from mola.engine.checkpoint import checkpoint_path, load_checkpoint
from mola.engine.config import RunConfig
from mola.engine.losses import task_loss

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OFFICE = SHARED / "office_caltech10"


def tiny_office(tmp_path: Path, **over: object) -> RunConfig:
    """Office-Caltech10 SURF features (4 shipped domains), MLP backbone: a real scenario that trains in seconds."""
    if not OFFICE.is_dir():
        pytest.skip("shipped Office-Caltech10 data not found")
    overrides = [
        f"data.root={OFFICE}", "data.kind=office_caltech10", "data.batch_size=64",
        "model.backbone.name=mlp", "model.backbone.width=16", "train.epochs=2", "train.max_steps_per_epoch=10",
        "train.progress=false", "train.tensorboard=false", "optim.lr=0.003",
    ] + [f"{k}={v}" for k, v in over.items()]
    cfg = load_config(None, overrides)
    cfg.out_dir = str(tmp_path)
    return cfg


def test_config_overrides_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ntrain: {epochs: 3}\nmodel: {mola: {rank: 8}}\n")
    cfg = load_config(p, ["train.seed=5", "model.mola.target_modules=[layer4.0.conv1]"], method="mola_router",
                      weighting="pcgrad")
    assert cfg.train.epochs == 3 and cfg.train.seed == 5 and cfg.model.mola.rank == 8
    assert cfg.model.mola.mode == "router" and cfg.model.arch == "mola" and cfg.train.weighting == "pcgrad"
    assert cfg.model.mola.target_modules == ["layer4.0.conv1"]
    cfg = load_config(p, [], method="dann", arch="hps")
    assert cfg.train.method == "dann" and cfg.model.arch == "hps"
    with pytest.raises(ValueError, match="unknown config key 'train.epoch'.*'epochs'"):
        load_config(p, ["train.epoch=3"])
    with pytest.raises(ValueError, match="must be an integer"):
        load_config(p, ["train.epochs=three"])
    with pytest.raises(ValueError, match="not one of"):
        load_config(p, ["model.mola.mode=routr"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_task_losses_hand_computed() -> None:
    depth = TaskInfo("d", kind="depth")
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.tensor([[[[2.0, 0.0], [1.0, 4.0]]]])  # one invalid (0) pixel
    assert task_loss(depth, pred, target).item() == pytest.approx((1 + 2 + 0) / 3)
    normal = TaskInfo("n", kind="normal")
    p = torch.zeros(1, 3, 1, 2)
    p[0, 0, 0, 0] = 1.0  # (1,0,0) vs target (0,1,0): 90 degrees -> 1 - cos = 1
    p[0, 1, 0, 1] = 2.0  # (0,2,0) vs target (0,1,0): 0 degrees -> 0
    t = torch.zeros(1, 3, 1, 2)
    t[0, 1] = 1.0
    assert task_loss(normal, p, t).item() == pytest.approx(0.5)
    seg = TaskInfo("s", kind="segmentation", num_classes=2)
    logits = torch.zeros(1, 2, 1, 2)
    tgt = torch.tensor([[[0, -1]]])
    assert task_loss(seg, logits, tgt).item() == pytest.approx(np.log(2))


@pytest.mark.parametrize("mode", ["grad", "router"])
def test_short_run_learns_and_beats_chance(tmp_path: Path, mode: str) -> None:
    cfg = tiny_office(tmp_path, **{"model.mola.mode": mode, "train.epochs": 3})
    trainer = Trainer(cfg, tmp_path / "run")
    final = trainer.fit()
    hist = trainer.history
    first = np.mean([v for k, v in hist[0].items() if k.startswith("train/")])
    last = np.mean([v for k, v in hist[-1].items() if k.startswith("train/")])
    assert last < first, (first, last)
    # chance = majority-class rate of each task's val labels
    val = trainer.scenario.val
    labels = np.array([int(val[i][1]) for i in range(len(val))])
    chance = np.mean([np.bincount(labels[val.task_ids == t]).max() / (val.task_ids == t).sum()
                      for t in range(trainer.scenario.num_tasks)])
    assert final["mean"]["val"]["acc"] > chance + 0.2, (final["mean"]["val"], chance)
    run = tmp_path / "run"
    for f in ("config.yaml", "metrics.csv", "final.json"):
        assert (run / f).is_file(), f
    for which in ("best", "last"):
        assert checkpoint_path(run, which).is_file() and checkpoint_path(run, which).suffix == ".safetensors"
    saved = json.loads((run / "final.json").read_text())
    assert set(saved) >= {"val", "test", "mean", "best_epoch"}
    assert set(saved["test"]) == {t.name for t in trainer.tasks}
    assert 0 <= saved["best_epoch"] < 3


def test_resume_is_exact(tmp_path: Path) -> None:
    """4 epochs straight == 2 epochs, stop, resume 2 more (same weights bit for bit, CPU, fixed seed)."""
    cfg4 = tiny_office(tmp_path, **{"train.epochs": 4, "model.mola.mode": "router", "train.weighting": "rlw"})
    a = Trainer(cfg4, tmp_path / "a")
    a.fit()
    cfg2 = tiny_office(tmp_path, **{"train.epochs": 2, "model.mola.mode": "router", "train.weighting": "rlw"})
    b = Trainer(cfg2, tmp_path / "b")
    b.fit()
    c = Trainer(cfg4, tmp_path / "b")
    c.resume()
    assert c.epoch == 2
    c.fit()
    a_last = load_checkpoint(checkpoint_path(tmp_path / "a", "last"))["model"]
    c_last = load_checkpoint(checkpoint_path(tmp_path / "b", "last"))["model"]
    assert a_last.keys() == c_last.keys()
    for k in a_last:
        assert torch.equal(a_last[k], c_last[k]), k
    ha = [{k: v for k, v in r.items() if k != "seconds"} for r in a.history]
    hc = [{k: v for k, v in r.items() if k != "seconds"} for r in c.history]
    assert ha == hc


def test_checkpoint_from_other_config_is_refused(tmp_path: Path) -> None:
    cfg = tiny_office(tmp_path, **{"train.epochs": 1})
    Trainer(cfg, tmp_path / "r").fit()
    other = tiny_office(tmp_path, **{"train.epochs": 1, "model.mola.rank": 2})
    t = Trainer(other, tmp_path / "r")
    with pytest.raises(ValueError, match="another model config"):
        t.resume()
