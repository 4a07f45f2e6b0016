"""The bad-input matrix: every wrong input a user can give fails early with a clear error naming the problem
and where it was found (error type + message asserted for each case)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fixtures_data import make_image_tree, make_npz, make_office, truncate
from fixtures_toy import FEATURES, Case, NaNAfter, run_case, tiny_cfg, toy_scenario, train_toy
from mola.data import ArrayMultiTargetDataset, ArrayTaskDataset, DataConfig, Scenario, TaskInfo, build_scenario
from mola.data.base import ALL_TASKS
from mola.data.validate import validate_scenario
from mola.engine import NonFiniteLossError, Trainer, load_config
from mola.engine.checkpoint import checkpoint_path, load_checkpoint, load_latest, save_checkpoint
from mola.engine.setup import validate_names
from mola.models import build_model


# -- helpers ------------------------------------------------------------------------------------------------------
def names_of(*over: str, **short: str) -> None:
    validate_names(load_config(None, list(over), **short))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch run (in-memory data) with best/last checkpoints."""
    d = tmp_path_factory.mktemp("bad") / "run"
    Trainer(tiny_cfg("model.mola.rank=2"), d, scenario=toy_scenario()).fit()
    return d


def copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# -- case functions needing files ----------------------------------------------------------------------------------
def bad_config_file(tmp_path: Path, text: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    load_config(p)


def missing_config_file(tmp_path: Path) -> None:
    (tmp_path / "medmnist_grad.yaml").write_text("name: x\n")
    load_config(tmp_path / "medmnst_grad.yaml")


def folder_images_without_classes(tmp_path: Path) -> None:
    make_image_tree(tmp_path / "vlcs", {"dom": {"c0": 1}})
    for p in (tmp_path / "vlcs" / "dom" / "c0").iterdir():
        p.rename(tmp_path / "vlcs" / "dom" / p.name)
    (tmp_path / "vlcs" / "dom" / "c0").rmdir()
    build_scenario(DataConfig(kind="folder", root=str(tmp_path / "vlcs")))


def medmnist_without_npz(tmp_path: Path) -> None:
    (tmp_path / "med").mkdir()
    (tmp_path / "med" / "readme.txt").write_text("no data here")
    build_scenario(DataConfig(kind="medmnist", root=str(tmp_path / "med")))


def medmnist_truncated_npz(tmp_path: Path) -> None:
    truncate(make_npz(tmp_path / "med" / "bloodmnist.npz", (20, 5, 5), 8), keep=100)
    build_scenario(DataConfig(kind="medmnist", root=str(tmp_path / "med")))


def office_without_features(tmp_path: Path) -> None:
    make_office(tmp_path / "oc", "decaf6", {"amazon": 12})
    build_scenario(DataConfig(kind="office_caltech10", root=str(tmp_path / "oc"), feature="surf"))


def forward(model_kind: str, x: Any, t: Any) -> None:
    if model_kind == "vector":
        model = build_model(toy_scenario(), tiny_cfg().model)
    else:
        shape = (1, 8, 8)
        sc = Scenario("img", "multi_input", [TaskInfo(f"t{i}", num_classes=2) for i in range(3)],
                      *(ArrayTaskDataset(torch.zeros(3, *shape), torch.zeros(3), np.arange(3)) for _ in range(3)),
                      input_shape=shape)
        backbone = {"cnn": "small_cnn", "vit": "vit_small"}[model_kind]
        model = build_model(sc, tiny_cfg(f"model.backbone.name={backbone}", "model.backbone.width=4").model)
    model.eval()(x, t)


def resume_changed(run: Path, tmp_path: Path, *over: str) -> None:
    Trainer(tiny_cfg("model.mola.rank=2", *over), copy_run(run, tmp_path), scenario=toy_scenario()).resume()


def flip_byte(run: Path, tmp_path: Path, where: float) -> None:
    d = copy_run(run, tmp_path)
    p = checkpoint_path(d, "last")
    data = bytearray(p.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    p.write_bytes(bytes(data))
    load_checkpoint(p)


def truncated(run: Path, tmp_path: Path) -> None:
    d = copy_run(run, tmp_path)
    truncate(checkpoint_path(d, "best"), keep=len(checkpoint_path(d, "best").read_bytes()) // 2)
    load_checkpoint(checkpoint_path(d, "best"))


def not_mola(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    load_checkpoint(tmp_path / "weights.safetensors")


def garbage(tmp_path: Path) -> None:
    (tmp_path / "x.safetensors").write_text("hello")
    load_checkpoint(tmp_path / "x.safetensors")


def model_tensors_do_not_fit(run: Path) -> None:
    ckpt = load_checkpoint(checkpoint_path(run, "best"))
    key = next(iter(ckpt["model"]))
    ckpt["model"].pop(key)
    Trainer(tiny_cfg("model.mola.rank=2"), run, scenario=toy_scenario()).load_state(ckpt, training=False)


def both_corrupt(run: Path, tmp_path: Path) -> None:
    d = copy_run(run, tmp_path)
    t = Trainer(tiny_cfg("model.mola.rank=2"), d, scenario=toy_scenario())
    t.save("last")  # the first last becomes last.prev
    for p in (d / "checkpoints").glob("last*.safetensors"):
        truncate(p, keep=64)
    load_latest(d)


def cli_eval_corrupt(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mola.cli.main import main

    d = copy_run(run, tmp_path)
    truncate(checkpoint_path(d, "best"), keep=1000)
    assert main(["eval", "--checkpoint", str(d)]) == 2
    raise ValueError(capsys.readouterr().err)


# -- the matrix ----------------------------------------------------------------------------------------------------
CASES: list[Case] = [
    # names and config keys (did-you-mean)
    ("unknown data kind", lambda: names_of("data.kind=medmist"), ValueError,
     r"unknown data kind 'medmist'\. Did you mean 'medmnist'"),
    ("unknown arch", lambda: names_of(arch="mmoo"), ValueError, r"unknown arch 'mmoo'\. Did you mean 'mmoe'"),
    ("unknown weighting", lambda: names_of(weighting="pcgard"), ValueError,
     r"unknown weighting 'pcgard'\. Did you mean 'pcgrad'"),
    ("unknown domain method", lambda: names_of(method="dan"), ValueError,
     r"unknown method 'dan' .*Did you mean 'dann'"),
    ("misspelt mola method", lambda: names_of(method="mola_gard"), ValueError,
     r"unknown method 'mola_gard' .*Did you mean 'mola_grad'"),
    ("shorthand as train.method", lambda: names_of("train.method=mola_router"), ValueError,
     r"train\.method 'mola_router' is a --method shorthand"),
    ("unknown backbone", lambda: names_of("model.backbone.name=resnet19"), ValueError,
     r"unknown backbone 'resnet19'\. Did you mean 'resnet18'"),
    ("unknown top-level key", lambda tmp_path: bad_config_file(tmp_path, "trian: {epochs: 1}\n"), ValueError,
     r"unknown config key 'trian'\. Did you mean 'train'"),
    ("unknown nested key", lambda: load_config(None, ["train.epoch=3"]), ValueError,
     r"unknown config key 'train\.epoch'\. Did you mean 'epochs'"),
    ("unknown deep key", lambda: load_config(None, ["model.mola.rnak=3"]), ValueError,
     r"unknown config key 'model\.mola\.rnak'\. Did you mean 'rank'"),
    ("wrong value type", lambda: load_config(None, ["train.epochs=three"]), ValueError,
     r"'train\.epochs' must be an integer, got 'three'"),
    ("on_nonfinite typo", lambda: load_config(None, ["train.on_nonfinite=ignore"]), ValueError,
     r"'train\.on_nonfinite': 'ignore' is not one of \['stop', 'skip'\]"),
    ("sampling typo", lambda: load_config(None, ["data.sampling=mixd"]), ValueError,
     r"'data\.sampling': 'mixd' is not one of"),
    ("override without =", lambda: load_config(None, ["train.epochs"]), ValueError,
     r"override 'train\.epochs' is not of the form dotted\.key=value"),
    ("config file misspelt", missing_config_file, FileNotFoundError,
     r"config file not found: .*medmnst_grad\.yaml\. Did you mean .*medmnist_grad\.yaml"),
    ("config not a mapping", lambda tmp_path: bad_config_file(tmp_path, "- a\n- b\n"), ValueError,
     r"c\.yaml must hold a mapping at top level"),
    ("config not YAML", lambda tmp_path: bad_config_file(tmp_path, "train: {epochs: [1\n"), ValueError,
     r"c\.yaml is not valid YAML"),
    ("checkpoint_every_steps 0", lambda tmp_path: Trainer(tiny_cfg("train.checkpoint_every_steps=0"), tmp_path,
                                                          scenario=toy_scenario()), ValueError,
     r"train\.checkpoint_every_steps must be >= 1 \(or null\), got 0"),
    # task ids and labels in datasets (checked when the scenario is built)
    ("task id off by one", lambda: validate_scenario(toy_scenario(task_ids=np.arange(16) % 2 + 1)), ValueError,
     r"train split of scenario 'toy': task id 2 at index 1 is out of range \[0, 2\) for the 2 task\(s\) t0, t1"),
    ("negative task id", lambda: validate_scenario(toy_scenario(task_ids=np.r_[0, 1, 0, -1, np.zeros(12, int)])),
     ValueError, r"task id -1 at index 3 is out of range \[0, 2\)"),
    ("fractional task ids", lambda: toy_scenario(task_ids=np.r_[0, 1, 0.5, np.zeros(13)]), ValueError,
     r"task ids must be integers, got 0\.5 at index 2 \(dtype float64\)"),
    ("boolean task ids", lambda: toy_scenario(task_ids=np.arange(16) % 2 == 1), ValueError,
     r"task ids must be integers, got dtype bool"),
    ("fractional labels", lambda: toy_scenario(labels=np.r_[np.zeros(3), 1.25, np.zeros(12)]), ValueError,
     r"labels must be integers, got 1\.25 at index 3"),
    ("label out of range", lambda: validate_scenario(toy_scenario(labels=np.r_[0, 1, 2, 1, 7, np.zeros(11, int)])),
     ValueError, r"train split of scenario 'toy': label 7 at index 4 is out of range for task 't0' "
                 r"\(3 classes: labels 0\.\.2\)"),
    ("negative label", lambda: validate_scenario(toy_scenario(labels=np.r_[0, -2, np.zeros(14, int)])), ValueError,
     r"label -2 at index 1 is out of range for task 't1'"),
    ("domain label vs shared head", lambda: validate_scenario(
        toy_scenario(kind="domain", labels=np.r_[np.zeros(15, int), 3])), ValueError,
     r"label 3 at index 15 is out of range for task 't1' \(3 classes"),
    ("segmentation target out of range", lambda: validate_scenario(Scenario(
        "seg", "single_input", [TaskInfo("seg", "segmentation", 4)],
        *(ArrayMultiTargetDataset(torch.zeros(2, 1, 2, 2), {"seg": torch.tensor([[[0, 1], [2, -1]],
                                                                                  [[3, 9], [0, 0]]])})
          for _ in range(3)), input_shape=(1, 2, 2))), ValueError,
     r"label 9 at index 1 is out of range for task 'seg' \(4 classes"),
    ("single-input task id", lambda: validate_scenario(Scenario(
        "si", "single_input", [TaskInfo("a", num_classes=2)],
        ArrayTaskDataset(torch.zeros(2, 3), torch.zeros(2), np.array([ALL_TASKS, 0])),
        *(ArrayMultiTargetDataset(torch.zeros(2, 3), {"a": torch.zeros(2)}) for _ in range(2)),
        input_shape=(3,))), ValueError, r"single-input samples carry task id -1 .*sample 1 has task id 0"),
    ("empty train split", lambda: validate_scenario(toy_scenario((0, 8, 8))), ValueError,
     r"train split of scenario 'toy' is empty; check data\.root"),
    ("empty val split", lambda tmp_path: Trainer(tiny_cfg(), tmp_path, scenario=toy_scenario((16, 0, 8))), ValueError,
     r"val split of scenario 'toy' is empty"),
    ("task without training data", lambda: validate_scenario(toy_scenario(task_ids=np.zeros(16, int))), ValueError,
     r"train split of scenario 'toy': task\(s\) 't1' have no training samples"),
    # on-disk layouts
    ("data root missing", lambda tmp_path: build_scenario(DataConfig(kind="folder", root=str(tmp_path / "nope"))),
     FileNotFoundError, r"data folder '.*nope' does not exist; expected layout:\n.*<domain>/"),
    ("folder without class folders", folder_images_without_classes, ValueError,
     r"domain folder '.*dom' has no class sub-folders.*expected layout"),
    ("medmnist folder without npz", medmnist_without_npz, FileNotFoundError,
     r"no MedMNIST \.npz file or task folder in '.*med'"),
    ("truncated npz", medmnist_truncated_npz, ValueError, r"cannot read npz file '.*bloodmnist\.npz'"),
    ("office without the surf folder", office_without_features, FileNotFoundError,
     r"data folder '.*oc/surf' does not exist; expected layout:.*surf/ .*decaf6/"),
    # model inputs (checked before the first layer)
    ("float task ids in forward", lambda: forward("vector", torch.zeros(2, FEATURES), torch.zeros(2)), ValueError,
     r"task_ids must be an integer tensor, got dtype torch\.float32"),
    ("task id out of range in forward", lambda: forward("vector", torch.zeros(2, FEATURES), torch.tensor([0, 2])),
     ValueError, r"task id 2 out of range \[0, 2\) for the 2 task\(s\) of this model \(t0, t1\)"),
    ("task ids of another batch size", lambda: forward("vector", torch.zeros(3, FEATURES), torch.tensor([0, 1])),
     ValueError, r"task_ids must have shape \(3,\) to match the batch, got \(2,\)"),
    ("task ids as a list", lambda: forward("vector", torch.zeros(2, FEATURES), [0, 1]), ValueError,
     r"task_ids must be a torch\.Tensor of shape \(2,\), got list"),
    ("wrong feature count", lambda: forward("vector", torch.zeros(2, FEATURES + 1), torch.tensor([0, 1])),
     ValueError, r"model input has shape \(2, 7\), but the backbone only takes inputs \(B, 6\)"),
    ("wrong channel count", lambda: forward("cnn", torch.zeros(2, 3, 8, 8), torch.tensor([0, 1])), ValueError,
     r"model input has 3 channel\(s\) \(shape \(2, 3, 8, 8\)\), but the backbone was built for 1 channel\(s\)"),
    ("wrong image size for a ViT", lambda: forward("vit", torch.zeros(2, 1, 16, 16), torch.tensor([0, 1])),
     ValueError, r"model input has shape \(2, 1, 16, 16\), but the backbone only takes inputs \(B, 1, 8, 8\)"),
    ("vector into a conv backbone", lambda: forward("cnn", torch.zeros(2, 64), torch.tensor([0, 1])), ValueError,
     r"model input has shape \(2, 64\), but this .* was built for 4-d inputs \(B, 1, 8, 8\)"),
    # checkpoints
    ("checkpoint truncated", truncated, ValueError, r"checkpoint .*best\.safetensors is corrupt or truncated"),
    ("checkpoint bit flip (payload)", lambda run, tmp_path: flip_byte(run, tmp_path, 0.9), ValueError,
     r"last\.safetensors is corrupt or truncated: sha256 of its content does not match"),
    ("checkpoint bit flip (header)", lambda run, tmp_path: flip_byte(run, tmp_path, 0.0), ValueError,
     r"last\.safetensors is corrupt or truncated"),
    ("checkpoint is garbage", garbage, ValueError, r"x\.safetensors is corrupt or truncated"),
    ("safetensors but not mola", not_mola, ValueError, r"weights\.safetensors is not a mola checkpoint"),
    ("checkpoint missing", lambda tmp_path: load_checkpoint(checkpoint_path(tmp_path, "best")), FileNotFoundError,
     r"checkpoint not found: .*best\.safetensors"),
    ("unknown checkpoint name", lambda tmp_path: checkpoint_path(tmp_path, "worst"), ValueError,
     r"checkpoint must be one of best, last, got 'worst'"),
    ("resume with another model config", lambda run, tmp_path: resume_changed(run, tmp_path, "model.mola.rank=3"),
     ValueError, r"checkpoint .*last\.safetensors was written with another model config.*"
                 r"Differences \(checkpoint -> now\): model\.mola\.rank: 2 -> 3"),
    ("resume with another batch size", lambda run, tmp_path: resume_changed(run, tmp_path, "data.batch_size=8"),
     ValueError, r"another data config.*data\.batch_size: 4 -> 8"),
    ("checkpoint tensors do not fit", model_tensors_do_not_fit, ValueError,
     r"checkpoint .*best\.safetensors does not fit this model; missing \(1\)"),
    ("last and last.prev both corrupt", both_corrupt, ValueError,
     r"no loadable checkpoint in .*checkpoints: checkpoint .*last\.safetensors is corrupt.*"
     r"last\.prev\.safetensors is corrupt"),
    ("mola eval of a corrupt checkpoint", cli_eval_corrupt, ValueError,
     r"^mola: error: checkpoint .*best\.safetensors is corrupt or truncated"),
    # non-finite losses
    ("NaN loss stops the run", lambda tmp_path: train_toy(
        tmp_path, toy_scenario(train_tf=NaNAfter(8)), "train.checkpoint_every_steps=1"), NonFiniteLossError,
     r"non-finite loss at epoch 0 step 2 \(batch 2\) for task\(s\) .*t1.*; last good checkpoint: "
     r".*last\.safetensors \(resume from it"),
    ("NaN loss before any checkpoint", lambda tmp_path: train_toy(tmp_path, toy_scenario(train_tf=NaNAfter(0))),
     NonFiniteLossError, r"non-finite loss at epoch 0 step 0 \(batch 0\) .*last good checkpoint: none"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case: Case, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    run_case(case, request, tmp_path)


def test_matrix_is_large_enough() -> None:
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


def test_nonfinite_skip_skips_only_the_bad_step(tmp_path: Path) -> None:
    """on_nonfinite=skip: the one NaN batch (batch 1) is skipped with a warning; the run finishes, finite."""
    with pytest.warns(RuntimeWarning, match=r"skipped step 1 \(epoch 0, batch 1\): non-finite loss"):
        t = train_toy(tmp_path, toy_scenario(train_tf=NaNAfter(4, 8)), "train.on_nonfinite=skip")
    assert t.skipped_steps == 1 and t.step == 4
    assert all(torch.isfinite(v).all() for v in t.model.state_dict().values() if v.is_floating_point())


def test_save_checkpoint_refuses_objects(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"checkpoint state 'extra': cannot store a object"):
        save_checkpoint({"model": {}, "config": {}, "epoch": 0, "best_epoch": 0, "extra": object()}, tmp_path)
