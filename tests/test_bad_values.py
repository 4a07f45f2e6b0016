"""Round 2 of the bad-input matrix (issue 15): values, not only shapes. Every example of the issue has a case
here (or in test_reliability_kills.py) asserting the error type and message, or the converted value."""

from __future__ import annotations

import errno
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save as st_save

from fixtures_data import make_image_tree, make_npz, make_nyuv2, truncate, write_png
from fixtures_toy import Case, NaNAfter, run_case, tiny_cfg, toy_scenario, train_toy
from mola.cli.main import _one_line, main
from mola.data import DataConfig, Scenario, build_scenario
from mola.data.layouts._common import pixels_to_unit, read_digit_csv, verify_image_files
from mola.data.transforms import ImageFileTransform
from mola.engine import NonFiniteLossError, Trainer, load_config
from mola.engine.checkpoint import FORMAT, VERSION, _digest, checkpoint_path, load_checkpoint
from mola.engine.trainer import NonFiniteMetricError, resolve_device
from mola.inject import MoLAConfig, inject
from mola.models.backbones import BackboneConfig, build_backbone
from mola.task_inference import TaskCentroids


# -- helpers ------------------------------------------------------------------------------------------------------
class NaNForTask:
    """Val transform: NaN inputs for the samples of one task (its val loss becomes NaN)."""

    def __init__(self, ids: np.ndarray, task: int) -> None:
        self.ids, self.task, self.i = ids, task, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = self.ids[self.i % len(self.ids)]
        self.i += 1
        return torch.full_like(x, math.nan) if t == self.task else x


def med_root(tmp_path: Path, **kw: Any) -> Path:
    make_npz(tmp_path / "med" / "bloodmnist.npz", (12, 4, 4), 3, **kw)
    return tmp_path / "med"


def write_npz(path: Path, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    n = len(images)
    labels = np.arange(n) % 3 if labels is None else labels
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{f"{s}_{k}": v for s in ("train", "val", "test")
                      for k, v in (("images", images), ("labels", labels.reshape(-1, 1)))})
    return path


def medmnist(root: Path, *over: str) -> Scenario:
    return build_scenario(DataConfig(kind="medmnist", root=str(root)))


def train_config(tmp_path: Path) -> Path:
    root = med_root(tmp_path)
    c = tmp_path / "c.yaml"
    c.write_text(f"name: x\ndata: {{kind: medmnist, root: {root}, batch_size: 8}}\n"
                 "model: {backbone: {name: mlp, width: 1}}\n"
                 "train: {epochs: 2, progress: false, tensorboard: false, device: cpu}\n")
    return c


# -- case functions ---------------------------------------------------------------------------------------------
def yaml_file(tmp_path: Path, text: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    load_config(p)


def twd_nan(tmp_path: Path) -> None:
    t = Trainer(tiny_cfg("model.mola.mode=router"), tmp_path / "r", scenario=toy_scenario())
    t.model.extra_loss = lambda gather=None: torch.tensor(math.nan, requires_grad=True)  # type: ignore[method-assign]
    t.fit()


def nan_weights_not_saved(tmp_path: Path) -> None:
    t = Trainer(tiny_cfg(), tmp_path / "r", scenario=toy_scenario())
    with torch.no_grad():
        next(t.model.parameters()).fill_(math.nan)
    try:
        t.save("last")
    finally:
        assert not checkpoint_path(tmp_path / "r", "last").exists()


def npz_with(tmp_path: Path, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    medmnist(write_npz(tmp_path / "med" / "bloodmnist.npz", images, labels).parent)


def npy_folder_mixed_sizes(tmp_path: Path) -> None:
    d = tmp_path / "med" / "dermamnist_x"
    d.mkdir(parents=True)
    for s, side in (("train", 28), ("val", 32), ("test", 28)):
        np.save(d / f"{s}_images.npy", np.zeros((6, side, side), np.uint8))
        np.save(d / f"{s}_labels.npy", (np.arange(6) % 2).reshape(-1, 1))
    medmnist(tmp_path / "med")


def resnet50_into_resnet18(tmp_path: Path, strict: bool = True) -> None:
    import torchvision

    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "r50.pt")
    build_backbone(BackboneConfig(name="resnet18", weights=str(tmp_path / "r50.pt"), strict=strict), (3, 32, 32),
                   False)


def centroids_with_nan() -> None:
    TaskCentroids.from_dict({"format": "mola-task-centroids", "version": 1, "tasks": ["a", "b"],
                             "centroids": [[0.0, 1.0], [None, 2.0]], "sigma2": 1.0, "counts": [3, 4]},
                            "task_centroids.json")


def adapter_bit_flip(tmp_path: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    m = inject(net, MoLAConfig(num_experts=2, rank=2, target_modules=["0"]))
    with torch.no_grad():
        m.model[0].lora_B.normal_()
    p = tmp_path / "a.safetensors"
    m.save_adapters(p)
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x04  # inside the last tensor's bytes
    p.write_bytes(bytes(data))
    m.load_adapters(p)


def cli(capsys: pytest.CaptureFixture[str], *argv: str, code: int) -> None:
    """Run the CLI; assert the exit code and that stderr is one line (besides the per-epoch progress lines);
    raise it as a ValueError to match."""
    assert main(list(argv)) == code
    err = "\n".join(ln for ln in capsys.readouterr().err.strip().splitlines() if not re.match(r"epoch \d+/\d+: ", ln))
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    raise ValueError(err)


def train_interrupted(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = Trainer.train_epoch

    def epoch_then_ctrl_c(self: Trainer, progress: Any = None, writer: Any = None) -> dict[int, float]:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, progress, writer)

    monkeypatch.setattr(Trainer, "train_epoch", epoch_then_ctrl_c)
    cli(capsys, "train", "--config", str(train_config(tmp_path)), "--out", str(tmp_path / "run"), code=130)


def eval_interrupted(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["train", "--config", str(train_config(tmp_path)), "--out", str(tmp_path / "run"),
                 "train.epochs=1"]) == 0
    capsys.readouterr()

    def ctrl_c(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    import mola.engine

    monkeypatch.setattr(mola.engine, "evaluate", ctrl_c)  # what `mola eval` calls per split
    cli(capsys, "eval", "--checkpoint", str(tmp_path / "run"), code=130)


def disk_full(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import mola.engine.checkpoint as ck

    def full(data: bytes, path: Path, *args: Any, **kw: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ck, "atomic_write_bytes", full)
    cli(capsys, "train", "--config", str(train_config(tmp_path)), "--out", str(tmp_path / "run"), code=1)


def out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("x")
    cli(capsys, "train", "--config", str(train_config(tmp_path)), "--out", str(tmp_path / "f"), code=2)


def eval_output_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    def no_work(*args: Any) -> None:
        raise AssertionError("the checkpoint was read before the output was checked")

    monkeypatch.setattr("mola.engine.checkpoint.load_checkpoint", no_work)
    cli(capsys, "eval", "--checkpoint", str(tmp_path), "--output", str(tmp_path), code=2)


def predict_args(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> None:
    cli(capsys, "predict", "--checkpoint", str(tmp_path / "nope"), "--images", str(tmp_path), *extra, code=2)


def bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lazy: bool) -> None:
    write_png(tmp_path / "big.png", np.random.default_rng(0), size=(40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 1600 px > 2 * 300: what PIL calls a bomb
    if lazy:
        ImageFileTransform(8)(tmp_path / "big.png")
    else:
        verify_image_files([tmp_path / "big.png"])


def crafted_checkpoint(tmp_path: Path, skeleton: str) -> None:
    tensors = {"model/w": torch.zeros(2)}
    meta = {"format": FORMAT, "version": VERSION, "state": skeleton, "sha256": _digest(skeleton, tensors)}
    (tmp_path / "c.safetensors").write_bytes(st_save(tensors, meta))
    load_checkpoint(tmp_path / "c.safetensors")


def nyuv2_with(tmp_path: Path, fix: Callable[[Path], None]) -> None:
    root = make_nyuv2(tmp_path / "nyu", n_train=4, n_val=2)
    fix(root)
    sc = build_scenario(DataConfig(kind="nyuv2", root=str(root), val_fraction=0.0))
    for i in range(len(sc.train)):
        sc.train[i]


def worker_error(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    from mola.data.layouts._common import ImageFileDataset

    make_image_tree(tmp_path / "d", {"a": {"c": 2}})
    bad = tmp_path / "d" / "a" / "c" / "001.png"
    truncate(bad)
    ds = ImageFileDataset([tmp_path / "d" / "a" / "c" / "000.png", bad], [0, 0], [0, 0], ImageFileTransform(8))
    try:
        list(DataLoader(ds, batch_size=1, num_workers=1))
    except ValueError as err:
        assert "Original Traceback" in str(err)
        raise ValueError(_one_line(err)) from None


# -- the matrix ----------------------------------------------------------------------------------------------------
FINITE = r"must be a finite number, got (nan|inf)"

CASES: list[Case] = [
    # config numbers, range-checked when read
    ("grad_clip < 0", lambda: load_config(None, ["optim.grad_clip=-1"]), ValueError,
     r"config key optim\.grad_clip must be > 0 \(or null\), got -1\.0"),
    ("max_steps_per_epoch < 0", lambda: load_config(None, ["train.max_steps_per_epoch=-1"]), ValueError,
     r"train\.max_steps_per_epoch must be >= 1 \(or null\), got -1"),
    ("image_size 0", lambda: load_config(None, ["data.image_size=0"]), ValueError,
     r"data\.image_size must be >= 1 \(or null\), got 0"),
    ("width 0", lambda: load_config(None, ["model.backbone.width=0"]), ValueError,
     r"model\.backbone\.width must be >= 1, got 0"),
    ("rank 0", lambda: load_config(None, ["model.mola.rank=0"]), ValueError,
     r"MoLAConfig\.rank=0; expected an integer >= 1"),
    ("rank dict entry 0", lambda: load_config(None, ["model.mola.rank={'*': 0}"]), ValueError,
     r"MoLAConfig\.rank\['\*'\]=0"),
    ("num_experts < 0", lambda: load_config(None, ["model.mola.num_experts=-2"]), ValueError,
     r"MoLAConfig\.num_experts=-2; expected an integer >= 0"),
    ("batch_size 0", lambda: load_config(None, ["data.batch_size=0"]), ValueError, r"data\.batch_size must be >= 1"),
    ("epochs 0", lambda: load_config(None, ["train.epochs=0"]), ValueError, r"train\.epochs must be >= 1, got 0"),
    ("alpha NaN in config", lambda: load_config(None, ["model.mola.alpha=.nan"]), ValueError,
     r"'model\.mola\.alpha' " + FINITE),
    ("twd_tau inf in config", lambda: load_config(None, ["model.mola.twd_tau=.inf"]), ValueError,
     r"'model\.mola\.twd_tau' " + FINITE),
    ("lr NaN in a YAML file", lambda tmp_path: yaml_file(tmp_path, "optim: {lr: .nan}\n"), ValueError,
     r"'optim\.lr' " + FINITE),
    ("alpha NaN in the API", lambda: MoLAConfig(alpha=math.nan), ValueError,
     r"MoLAConfig\.alpha=nan; expected a finite"),
    ("twd_weight NaN in the API", lambda: MoLAConfig(twd_weight=math.nan), ValueError, r"MoLAConfig\.twd_weight=nan"),
    ("twd_tau inf in the API", lambda: MoLAConfig(twd_tau=math.inf), ValueError, r"MoLAConfig\.twd_tau=inf"),
    ("alpha 0 in the API", lambda: MoLAConfig(alpha=0), ValueError, r"MoLAConfig\.alpha=0; expected a number > 0"),
    ("fractions leave no train", lambda: load_config(None, ["data.val_fraction=0.5", "data.test_fraction=0.5"]),
     ValueError, r"val_fraction \+ data\.test_fraction must be < 1"),
    ("duplicate YAML key", lambda tmp_path: yaml_file(tmp_path, "train:\n  epochs: 3\n  seed: 1\n  epochs: 5\n"),
     ValueError, r"c\.yaml is not valid YAML: duplicate key 'epochs' \(lines 2 and 4\)"),
    ("rank larger than the layer", lambda: inject(torch.nn.Sequential(torch.nn.Linear(4, 8)),
                                                  MoLAConfig(num_experts=2, rank=100000, target_modules=["0"])),
     ValueError, r"MoLA rank 100000 for layer '0' \(Linear weight \(8, 4\).*exceeds the largest rank .* \(4\)"),
    ("num_experts 10**6", lambda: inject(torch.nn.Sequential(torch.nn.Linear(512, 512)),
                                         MoLAConfig(num_experts=10**6, rank=4, target_modules=["0"])),
     ValueError, r"MoLA adapters would need 16\.4 GB .*num_experts=1000000.*max_adapter_gb=None\) to lift"),
    # non-finite values during training
    ("TwD loss NaN", twd_nan, NonFiniteLossError,
     r"non-finite loss at epoch 0 step 0 \(batch 0\) for task\(s\) twd \(the architecture's extra loss\)"),
    ("NaN weights are not checkpointed", nan_weights_not_saved, NonFiniteLossError,
     r"model weights became non-finite at epoch 0 step 0 .*not writing them as a checkpoint"),
    ("NaN validation metric", lambda tmp_path: train_toy(tmp_path, toy_scenario(val_tf=NaNAfter(0))),
     NonFiniteMetricError,
     r"non-finite validation metric at epoch 0 \(split val\): task 't0': val loss = nan; task 't1'"),
    ("N consecutive skips stop", lambda tmp_path: train_toy(tmp_path, toy_scenario(train_tf=NaNAfter(4)),
                                                        "train.on_nonfinite=skip", "train.max_consecutive_skips=2"),
     NonFiniteLossError, r"non-finite loss at epoch 0 step 2 \(batch 2\).*2 steps in a row were non-finite "
                         r"\(train\.max_consecutive_skips=2\)"),
    # data values
    ("fractional npz labels", lambda tmp_path: npz_with(tmp_path, np.zeros((6, 28, 28), np.uint8),
                                                        np.array([0, 1, 2, 1.5, 0, 1])), ValueError,
     r"bloodmnist\.npz' split 'train': labels must be integers, got 1\.5 at index 3"),
    ("label 10**9", lambda tmp_path: npz_with(tmp_path, np.zeros((6, 28, 28), np.uint8),
                                              np.array([0, 1, 2, 10**9, 0, 1], np.uint32)), ValueError,
     r"split 'train': label 1000000000 at index 3 is not a class index"),
    ("NaN pixels in npz", lambda tmp_path: npz_with(tmp_path, np.where(np.arange(6)[:, None, None] == 4, np.nan,
                                                                       np.zeros((6, 28, 28), np.float32))),
     ValueError, r"bloodmnist\.npz' split 'train': image at index 4 holds NaN or inf pixels"),
    ("negative pixels", lambda: pixels_to_unit(np.r_[np.zeros((2, 4, 4)), -np.ones((1, 4, 4))], "usps.h5 'train'"),
     ValueError, r"usps\.h5 'train': pixel value -1 at index 2 is negative"),
    ("float pixels above 255", lambda: pixels_to_unit(np.full((2, 4, 4), 300.0), "f"), ValueError,
     r"f: pixel value 300 at index 0 is outside the accepted ranges"),
    ("csv pixel above 255", lambda tmp_path: (tmp_path / "d.csv").write_text("0," * 3 + "300,1\n") and
     read_digit_csv(tmp_path / "d.csv", side=2), ValueError, r"d\.csv': row 0 holds pixel value 300 outside 0\.\.255"),
    ("npy splits of different sizes", npy_folder_mixed_sizes, ValueError,
     r"dermamnist_x': splits hold images of different sizes \(train 28x28, val 32x32, test 28x28\)"),
    ("ResNet-50 weights into ResNet-18", resnet50_into_resnet18, ValueError,
     r"backbone weights .*r50\.pt do not fit ResNet\w* \(\d+ of \d+ tensors fit\); unexpected \(198\): layer1\.0\.conv3"
     r".*shape mismatch \(\d+\):.*layer1\.0\.conv1\.weight \(64, 64, 1, 1\) vs \(64, 64, 3, 3\).*strict: false"),
    ("NaN task centroid", centroids_with_nan, ValueError,
     r"task_centroids\.json is corrupt: the centroid of task\(s\) 'b' holds NaN"),
    ("adapter file bit flip", adapter_bit_flip, ValueError, r"corrupt adapter file .*a\.safetensors: the sha256"),
    ("NYUv2 mixed image sizes", lambda tmp_path: nyuv2_with(
        tmp_path, lambda r: np.save(r / "train" / "image" / "2.npy", np.zeros((3, 9, 12), np.float32))),
     ValueError, r"NYUv2 image .*image/2\.npy' \(index \d\) is 9x12, but the images of this scenario are 8x12"),
    ("NYUv2 label above the class count", lambda tmp_path: nyuv2_with(
        tmp_path, lambda r: np.save(r / "train" / "label" / "1.npy", np.full((8, 12), 13.0, np.float32))),
     ValueError, r"segmentation label file .*label/1\.npy' \(index \d\) holds 13\.0; labels must be integers "
                 r"in 0\.\.12 or -1"),
    ("decompression bomb at layout read", lambda tmp_path, monkeypatch: bomb(tmp_path, monkeypatch, False),
     ValueError, r"cannot read image file '.*big\.png'"),
    ("decompression bomb when read", lambda tmp_path, monkeypatch: bomb(tmp_path, monkeypatch, True), ValueError,
     r"cannot read image file '.*big\.png'"),
    ("truncated image at layout read", lambda tmp_path: (truncate(
        make_image_tree(tmp_path / "d", {"a": {"c": 3}, "b": {"c": 3}}) / "b" / "c" / "002.png"),
        build_scenario(DataConfig(kind="folder", root=str(tmp_path / "d")))), ValueError,
     r"cannot read image file '.*b/c/002\.png'"),
    ("corrupt image in a DataLoader worker", worker_error, ValueError,
     r"^cannot read image file '.*001\.png'"),
    # checkpoints crafted by hand
    ("checkpoint JSON 100k deep", lambda tmp_path: crafted_checkpoint(tmp_path, "[" * 100_000 + "]" * 100_000),
     ValueError, r"c\.safetensors is corrupt or truncated: its state record is nested too deeply"),
    ("checkpoint field of the wrong type", lambda tmp_path: crafted_checkpoint(tmp_path, json.dumps(
        {"model": {"w": {"__tensor__": "model/w"}}, "config": {}, "epoch": "5", "best_epoch": 0})), ValueError,
     r"c\.safetensors is malformed: 'epoch' is a str, expected int"),
    ("checkpoint state not a mapping", lambda tmp_path: crafted_checkpoint(tmp_path, "[1, 2]"), ValueError,
     r"c\.safetensors is not a mola checkpoint \(its state is a list"),
    # errors raised before long work
    ("select_metric f1",
     lambda tmp_path: Trainer(tiny_cfg("train.select_metric=f1"), tmp_path, scenario=toy_scenario()),
     ValueError, r"train\.select_metric 'f1' is not reported by any task of this scenario; valid: acc, auc, loss"),
    ("single_task_results missing", lambda tmp_path: Trainer(
        tiny_cfg(f"train.single_task_results={tmp_path / 'missing.json'}"), tmp_path, scenario=toy_scenario()),
     FileNotFoundError, r"train\.single_task_results: file not found: .*missing\.json"),
    ("device tpu9", lambda: resolve_device("tpu9"), ValueError, r"train\.device 'tpu9' is not a device name"),
    ("device cuda:99", lambda: resolve_device("cuda:99"), ValueError,
     r"train\.device 'cuda:99': (no CUDA GPU is available|this machine has \d+ CUDA GPU)"),
    # the command line: one line, no traceback
    ("Ctrl-C in train", train_interrupted, ValueError,
     r"^mola: interrupted \(Ctrl-C\); last checkpoint: .*run/checkpoints/last\.safetensors; continue with: "
     r"mola train --config \S+\.yaml --out \S+/run --resume$"),
    ("Ctrl-C in eval", eval_interrupted, ValueError, r"^mola: interrupted \(Ctrl-C\); nothing was written$"),
    ("disk full", disk_full, ValueError, r"^mola: error: \[Errno 28\] No space left on device: '.*best\.safetensors'"),
    ("--out is a file", out_is_a_file, ValueError, r"^mola: error: run directory \(--out\) .*/f is a file"),
    ("eval --output is a folder", eval_output_is_a_folder, ValueError, r"^mola: error: --output .* is a folder"),
    ("predict --top-k 0", lambda tmp_path, capsys: predict_args(tmp_path, capsys, "--top-k", "0"), ValueError,
     r"^mola: error: --top-k must be >= 1, got 0$"),
    ("predict --batch-size 0", lambda tmp_path, capsys: predict_args(tmp_path, capsys, "--batch-size", "0"),
     ValueError, r"^mola: error: --batch-size must be >= 1, got 0$"),
    ("predict --device tpu9", lambda tmp_path, capsys: predict_args(tmp_path, capsys, "--device", "tpu9"),
     ValueError, r"^mola: error: --device 'tpu9' is not a device name"),
    ("predict --out in a missing-permission place", lambda tmp_path, capsys: predict_args(
        tmp_path, capsys, "--out", str(tmp_path)), ValueError, r"^mola: error: --out .* is a folder, not a file"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_value(case: Case, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    run_case(case, request, tmp_path, quiet=True)


# -- conversions and warnings (the value is asserted) -----------------------------------------------------------------
def test_16bit_png_is_scaled_by_its_bit_depth(tmp_path: Path) -> None:
    a = np.array([[0, 257 * 100], [65535, 32896]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # PIL would clip this to 255 when converting to L
    tf = ImageFileTransform(2, channels=1)
    assert np.asarray(tf.load(tmp_path / "g16.png")).tolist() == [[0, 100], [255, 128]]
    rgb = np.asarray(ImageFileTransform(2, channels=3).load(tmp_path / "g16.png"))
    assert rgb[0, 1].tolist() == [100, 100, 100]


@pytest.mark.parametrize("dtype,scale", [(np.uint16, 65535.0), (np.float32, 255.0), (np.int32, 255.0),
                                         (np.float64, 1.0), (np.uint8, 255.0)])
def test_npz_pixel_ranges_are_rescaled(tmp_path: Path, dtype: type, scale: float) -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 255, (6, 28, 28)).astype(np.float64) * (scale / 255.0)
    raw[0, 0, 0] = scale  # the top of the range is present
    images = raw.astype(dtype)
    sc = medmnist(write_npz(tmp_path / "med" / "bloodmnist.npz", images).parent)
    x = sc.train.inputs
    expected = (torch.from_numpy(images.astype(np.float64) / scale).float() - 0.5) / 0.5
    assert x.shape[1:] == (1, 28, 28)
    torch.testing.assert_close(x[:, 0].sort(0).values, expected.sort(0).values)  # splits are shuffled
    assert float(x.max()) == 1.0 and float(x.min()) >= -1.0


def test_float_images_in_unit_range_stay_and_0_255_floats_scale() -> None:
    x = np.array([[[0.0, 0.5], [1.0, 0.25]]], np.float32)
    assert pixels_to_unit(x, "a").tolist() == x.tolist()
    assert pixels_to_unit(x * 255, "b").tolist() == x.tolist()


def test_class_folders_differing_between_domains_are_named(tmp_path: Path) -> None:
    make_image_tree(tmp_path / "d", {"art": {"cat": 2, "dog": 2}, "photo": {"cat": 2}})
    with pytest.warns(RuntimeWarning, match=r"different class folders \(photo lacks dog\); the shared head uses "
                                            r"the union of all 2 classes"):
        sc = build_scenario(DataConfig(kind="folder", root=str(tmp_path / "d"), val_fraction=0.0,
                                       test_fraction=0.0))
    assert [t.num_classes for t in sc.tasks] == [2, 2]


def test_wrong_arch_weights_load_with_strict_false_and_a_warning(tmp_path: Path) -> None:
    with pytest.warns(RuntimeWarning, match=r"do not fit ResNet\w* .*loading the \d+ fitting tensors"):
        resnet50_into_resnet18(tmp_path, strict=False)


def test_adapters_much_larger_than_the_model_warn() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(16, 16))
    with pytest.warns(RuntimeWarning, match=r"MoLA adapters hold 65,536 parameters, 241x the 272"):
        inject(net, MoLAConfig(num_experts=128, rank=16, target_modules=["0"]))


def test_num_experts_limit_can_be_lifted() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    cfg = MoLAConfig(num_experts=200, rank=1, target_modules=["0"])
    with pytest.raises(ValueError, match="max_adapter_gb=1e-06"):
        inject(net, cfg, max_adapter_gb=1e-6)
    with pytest.warns(RuntimeWarning, match="adapters hold"):
        m = inject(torch.nn.Sequential(torch.nn.Linear(8, 8)), cfg, max_adapter_gb=None)
    assert m.num_parameters()["adapters"] == 200 * 1 * 16


def test_nan_metric_of_one_task_dropped_with_option(tmp_path: Path, toy_scenario: Callable[..., Scenario]) -> None:
    """on_nonfinite_metric=drop: the NaN task leaves the selection score (warning), the other task selects."""
    sc = toy_scenario()
    sc.val.transform = NaNForTask(sc.val.task_ids, task=1)
    with pytest.warns(RuntimeWarning, match=r"epoch 0: leaving task\(s\) 't1' out of the selection score"):
        t = train_toy(tmp_path, sc, "train.on_nonfinite_metric=drop")
    row = t.history[0]
    assert row["select_score"] == row["val/t0/acc"] and math.isnan(row["val/t1/loss"])
    assert t.best_epoch == 0


def test_best_on_val_follows_finite_scores_only(tmp_path: Path, toy_scenario: Callable[..., Scenario]) -> None:
    """select_score never returns NaN: the old 'a NaN score still gives a best' path is gone."""
    t = Trainer(tiny_cfg(), tmp_path / "r", scenario=toy_scenario())
    good = {"t0": {"acc": 0.5, "loss": 1.0}, "t1": {"acc": 0.25, "loss": 1.0}}
    assert t.select_score(good) == 0.375
    with pytest.raises(NonFiniteMetricError, match=r"epoch 7 \(split val\): task 't1': val acc = inf"):
        t.select_score({**good, "t1": {"acc": math.inf, "loss": 1.0}}, epoch=7)


def test_cuda_device_without_gpu_is_named() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match=r"train\.device 'cuda': no CUDA GPU is available here"):
        resolve_device("cuda")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_out_folder_is_refused_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["train", "--config", str(train_config(tmp_path)), "--out", str(ro / "run")]) == 2
    finally:
        ro.chmod(0o700)
    assert re.search(r"folder .*ro is not writable", capsys.readouterr().err)


def test_matrix_covers_the_issue() -> None:
    assert len(CASES) >= 50 and len({c[0] for c in CASES}) == len(CASES)


def test_office_features_nan_and_fractional_labels_are_refused(tmp_path: Path) -> None:
    import scipy.io

    folder = tmp_path / "oc" / "surf"
    folder.mkdir(parents=True)
    x = np.ones((4, 800))
    x[2, 5] = np.nan
    scipy.io.savemat(folder / "amazon_SURF_L10.mat", {"fts": x, "labels": np.array([[1], [2], [3], [4]])})
    cfg = DataConfig(kind="office_caltech10", root=str(tmp_path / "oc"), domains=["amazon"])
    with pytest.raises(ValueError, match=r"amazon_SURF_L10\.mat': 'fts' row 2 holds NaN or inf features"):
        build_scenario(cfg)
    scipy.io.savemat(folder / "amazon_SURF_L10.mat", {"fts": np.ones((4, 800)), "labels": np.array([1, 2, 2.5, 4])})
    with pytest.raises(ValueError, match=r"amazon_SURF_L10\.mat': labels must be integers, got 2\.5 at index 2"):
        build_scenario(cfg)
