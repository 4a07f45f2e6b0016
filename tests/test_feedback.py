"""Feedback while training: one line per epoch (also with ``progress: false``), curves.png, early stopping,
backbone freezing and ``print_trainable_parameters``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

import mola
from fixtures_data import make_task_folders
from mola.cli.main import main
from mola.data.base import TaskInfo
from mola.data.synthetic import ScenarioSpec, synthetic_scenario
from mola.engine import load_config
from mola.models import build_model

TINY = ["data.kind=tasks", "data.batch_size=8", "data.eval_batch_size=32", "train.progress=false",
        "train.tensorboard=false", "model.backbone.name=small_cnn", "model.backbone.width=4", "data.image_size=8"]


def test_epoch_lines_and_curves_without_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_task_folders(tmp_path / "mine")
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), f"data.root={root}", "train.epochs=2", *TINY]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("epoch ")]
    assert [ln.split(":")[0] for ln in lines] == ["epoch 1/2", "epoch 2/2"]
    assert all("train loss colors" in ln and "val colors acc" in ln and "xray acc" in ln for ln in lines)
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_early_stopping_stops_after_patience(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from mola.engine.trainer import Trainer

    root = make_task_folders(tmp_path / "mine")
    out = tmp_path / "run"
    # the score improves once (epoch 2), then falls: patience 2 stops after epoch 4 of 8
    scores = iter([0.1, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.0])
    monkeypatch.setattr(Trainer, "select_score", lambda self, val, epoch=None: next(scores))
    assert main(["train", "--out", str(out), f"data.root={root}", "train.epochs=8", "train.early_stopping=2",
                 *TINY]) == 0
    final = json.loads((out / "final.json").read_text())
    assert final["epochs"] == 4 and final["stopped_early"] and final["best_epoch"] == 1
    assert "early stopping" in capsys.readouterr().err


def test_freeze_backbone_trains_only_adapters_and_heads(capsys: pytest.CaptureFixture[str]) -> None:
    spec = ScenarioSpec("toy", "multi_input", [TaskInfo("a", "classification", 2), TaskInfo("b", "classification", 3)],
                        (3, 16, 16))
    cfg = load_config(None, ["model.backbone.name=small_cnn", "model.backbone.width=4", "model.freeze_backbone=true"])
    model = build_model(synthetic_scenario(spec), cfg.model)
    groups = model.parameter_groups()
    assert groups["backbone"] and not any(p.requires_grad for p in groups["backbone"])
    assert all(p.requires_grad for g in ("adapters", "heads") for p in groups[g])
    model.print_trainable_parameters()
    text = capsys.readouterr().out
    trainable = sum(p.numel() for g in ("adapters", "heads") for p in groups[g])
    total = sum(p.numel() for p in model.parameters())
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in text


def test_inject_print_trainable_parameters_and_freeze(capsys: pytest.CaptureFixture[str]) -> None:
    net = torchvision.models.resnet18(num_classes=4)
    model = mola.inject(net, mola.MoLAConfig(num_experts=2, rank=2))
    total = sum(p.numel() for p in model.parameters())
    model.print_trainable_parameters()
    assert f"trainable params: {total:,d} || all params: {total:,d} || trainable%: 100.0000" in capsys.readouterr().out
    model.freeze_backbone()
    adapters = sum(p.numel() for p in model.adapter_parameters().values())
    model.print_trainable_parameters()
    assert f"trainable params: {adapters:,d} ||" in capsys.readouterr().out
    loss = model(torch.randn(2, 3, 32, 32), task_ids=torch.tensor([0, 1])).sum()
    loss.backward()
    assert net.conv1.weight.grad is None
    assert all(p.grad is not None for p in model.adapter_parameters().values())
