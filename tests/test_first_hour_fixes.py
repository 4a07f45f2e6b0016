"""The smaller points of a first hour with mola: pretrained stems kept on small inputs, run names of --method
runs, a pasteable resume command, MedMNIST class names, the untuned-defaults note, MoLAConfig() in inject."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

import mola
from fixtures_data import make_npz, make_task_folders
from mola.cli.main import main, resume_command
from mola.data import DataConfig, build_scenario
from mola.data.layouts.medmnist import known_labels
from mola.models import BackboneConfig, build_backbone


def test_small_input_auto_keeps_the_pretrained_stem(tmp_path: Path) -> None:
    big = build_backbone(BackboneConfig(name="resnet18", small_input=False), (3, 224, 224), dense=False)
    weights = tmp_path / "r18.pt"
    torch.save(big.state_dict(), weights)
    small = build_backbone(BackboneConfig(name="resnet18", weights=str(weights)), (3, 28, 28), dense=False)
    assert small.conv1.kernel_size == (7, 7) and torch.equal(small.conv1.weight, big.conv1.weight)
    assert small(torch.randn(2, 3, 28, 28)).shape[1] == 512
    scratch = build_backbone(BackboneConfig(name="resnet18"), (3, 28, 28), dense=False)
    assert scratch.conv1.kernel_size == (3, 3)  # no weights: the small-input stem, as before


def test_method_runs_get_their_own_name_and_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_task_folders(tmp_path / "mine")
    base = ["train", "--config", "demo", "data.kind=tasks", f"data.root={root}", "--dry-run"]
    assert main([*base, "--method", "mola_router"]) == 0
    out = capsys.readouterr().out
    assert "name: demo_medmnist_grad-mola_router" in out and "runs/demo_medmnist_grad-mola_router (new)" in out
    assert main([*base, "--arch", "hps", "--weighting", "pcgrad"]) == 0
    assert "name: demo_medmnist_grad-hps-pcgrad" in capsys.readouterr().out
    assert main([*base, "--method", "mola_router", "name=mine"]) == 0
    assert "name: mine\n" in capsys.readouterr().out


def test_resume_command_is_pasteable() -> None:
    cmd = resume_command(["train", "--config", "my cfg.yaml", "--out", "old", "train.epochs=2", "--overwrite"],
                         Path("runs/x"))
    assert cmd == "mola train --config 'my cfg.yaml' train.epochs=2 --out runs/x --resume"


def test_medmnist_class_names(tmp_path: Path) -> None:
    assert known_labels("dermamnist_val_only", 7)[5] == "melanocytic nevi"
    assert known_labels("pneumoniamnist_kaggle_variant", 2) == ["normal", "pneumonia"]
    assert known_labels("breastmnist", 3) is None  # another class count: not the official table
    make_npz(tmp_path / "breastmnist.npz", (8, 4, 4), 2)
    make_npz(tmp_path / "mystery.npz", (8, 4, 4), 3)
    sc = build_scenario(DataConfig(kind="medmnist", root=str(tmp_path)))
    assert sc.extra["classes"] == {"breast": ["malignant", "normal, benign"], "mystery": ["0", "1", "2"]}


def test_dry_run_names_untuned_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_task_folders(tmp_path / "mine")
    args = ["train", "--dry-run", "data.kind=tasks", f"data.root={root}", "model.backbone.name=small_cnn"]
    assert main(args) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("untuned:"))
    assert "lr 0.05" in line and "model.mola.alpha (16)" in line and "optim.lr=0.02" in line
    assert main([*args, "optim.lr=0.02", "model.mola.alpha=4"]) == 0
    assert "untuned:" not in capsys.readouterr().out


def test_inject_with_default_config_says_what_to_set() -> None:
    with pytest.raises(ValueError, match=r"num_experts=0: inject needs the number of adapters.*num_experts=3"):
        mola.inject(torchvision.models.resnet18(), mola.MoLAConfig())


def test_three_task_folder_predicts_with_class_names(tmp_path: Path) -> None:
    root = make_task_folders(tmp_path / "mine", n=3)
    sc = build_scenario(DataConfig(kind="tasks", root=str(root), image_size=8))
    assert sc.preprocessing.channels == 3 and sc.preprocessing.size == (8, 8)
    x = sc.preprocessing.load(root / "colors" / "red" / "000.png")
    assert torch.allclose(x, sc.test.transform(str(root / "colors" / "red" / "000.png")))
