"""Every registered weighting, gradient and domain method trains through the real engine on shipped data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import mola.methods  # noqa: F401  (registers everything)
from mola.engine import Trainer, load_config
from mola.methods import DOMAIN_METHODS, WEIGHTINGS

OFFICE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "office_caltech10"
CASES = [("weighting", n) for n in WEIGHTINGS.names()] + [("method", n) for n in DOMAIN_METHODS.names() if n != "erm"]


@pytest.mark.parametrize("kind,name", CASES, ids=[n for _, n in CASES])
def test_method_short_run_beats_chance(tmp_path: Path, kind: str, name: str) -> None:
    if not OFFICE.is_dir():
        pytest.skip("shipped Office-Caltech10 data not found")
    cfg = load_config(None, [
        f"data.root={OFFICE}", "data.kind=office_caltech10", "data.batch_size=64", "model.backbone.name=mlp",
        "model.backbone.width=16", "train.epochs=2", "train.max_steps_per_epoch=12", "train.progress=false",
        "train.tensorboard=false", "train.eval_test=false", "optim.lr=0.003", f"train.{kind}={name}",
    ])
    trainer = Trainer(cfg, tmp_path / "run")
    final = trainer.fit()
    losses = [v for k, v in trainer.history[-1].items() if k.startswith("train/")]
    assert losses and all(math.isfinite(v) for v in losses)
    val = trainer.scenario.val
    labels = np.array([int(val[i][1]) for i in range(len(val))])
    chance = np.mean([np.bincount(labels[val.task_ids == t]).max() / (val.task_ids == t).sum()
                      for t in range(trainer.scenario.num_tasks)])
    assert final["mean"]["val"]["acc"] > chance + 0.1, (name, final["mean"]["val"]["acc"], chance)


@pytest.mark.parametrize("name", [n for n in DOMAIN_METHODS.names() if n != "erm"])
def test_domain_method_on_feature_maps(tmp_path: Path, name: str) -> None:
    """Conv backbones hand (B, C, h, w) maps to domain methods: they pool them to (B, C) and train."""
    import torch

    from mola.data.base import ArrayTaskDataset, Scenario, TaskInfo

    g = torch.Generator().manual_seed(0)
    n = 64
    ds = ArrayTaskDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g),
                          torch.arange(n) % 2)
    tasks = [TaskInfo(f"d{i}", num_classes=3) for i in range(2)]
    scenario = Scenario("maps", "domain", tasks, ds, ds, ds, (1, 8, 8), shared_head=True)
    cfg = load_config(None, ["model.backbone.name=small_cnn", "model.backbone.width=4", "data.batch_size=16",
                             "train.epochs=1", "train.progress=false", "train.tensorboard=false",
                             f"train.method={name}"])
    trainer = Trainer(cfg, tmp_path / "run", scenario=scenario)
    trainer.fit()
    assert all(math.isfinite(v) for k, v in trainer.history[-1].items() if k.startswith("train/"))


@pytest.mark.parametrize("arch", ["hps", "mola", "mmoe", "cgc", "dselect_k", "mtan"])
def test_dann_runs_on_batch_first_archs(tmp_path: Path, arch: str) -> None:
    """Every arch whose shared representation is batch-first gives domain methods their feature size."""
    import torch

    from mola.data.base import ArrayTaskDataset, Scenario, TaskInfo

    g = torch.Generator().manual_seed(0)
    ds = ArrayTaskDataset(torch.randn(48, 1, 8, 8, generator=g), torch.randint(0, 3, (48,), generator=g),
                          torch.arange(48) % 2)
    scenario = Scenario("maps", "domain", [TaskInfo(f"d{i}", num_classes=3) for i in range(2)], ds, ds, ds,
                        (1, 8, 8), shared_head=True)
    cfg = load_config(None, ["model.backbone.name=small_cnn", "model.backbone.width=4", "data.batch_size=16",
                             "train.epochs=1", "train.progress=false", "train.tensorboard=false",
                             "train.method=dann", f"model.arch={arch}"])
    trainer = Trainer(cfg, tmp_path / "run", scenario=scenario)
    assert trainer.method.feature_dim == trainer.model.feature_dim == 32
    trainer.fit()


def test_mtan_features_are_in_batch_order() -> None:
    """Domain methods read ctx.features row-aligned with task_ids, so MTAN must not leave them task-sorted."""
    import torch

    from mola.data.base import ArrayTaskDataset, Scenario, TaskInfo
    from mola.models import ModelConfig, build_model
    from mola.models.backbones import BackboneConfig

    ds = ArrayTaskDataset(torch.zeros(2, 1, 8, 8), torch.zeros(2), torch.zeros(2))
    sc = Scenario("m", "multi_input", [TaskInfo(f"t{i}", num_classes=3) for i in range(2)], ds, ds, ds, (1, 8, 8))
    model = build_model(sc, ModelConfig(arch="mtan", backbone=BackboneConfig(width=4))).eval()
    x = torch.randn(4, 1, 8, 8)
    ids = torch.tensor([1, 0, 1, 0])
    with torch.no_grad():
        model(x, ids)
        feats = model.features.clone()
        perm = torch.tensor([3, 2, 1, 0])
        model(x[perm], ids[perm])
    torch.testing.assert_close(model.features, feats[perm])
