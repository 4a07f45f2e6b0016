"""A tiny trained run (generated MedMNIST-style data, 1 epoch of a width-4 CNN) for export/predict tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SIZES = (48, 16, 16)
TASKS = {"bright": (3, 150, 256), "dark": (2, 0, 100)}  # short name: (classes, pixel low, pixel high)


def make_task_npz(path: Path, num_classes: int, low: int, high: int, seed: int) -> Path:
    """A MedMNIST-style npz whose images of one task share an intensity range (so tasks are distinguishable)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), SIZES, strict=True):
        arrays[f"{split}_images"] = rng.integers(low, high, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % num_classes).reshape(-1, 1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def make_data(root: Path) -> Path:
    for i, (name, (c, lo, hi)) in enumerate(TASKS.items()):
        make_task_npz(root / f"{name}mnist.npz", c, lo, hi, seed=i)
    return root


def write_test_pngs(data: Path, out: Path, per_task: int = 3) -> dict[str, np.ndarray]:
    """PNG files of the first test images of each task; returns name -> uint8 images written."""
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in TASKS:
        imgs = np.load(data / f"{name}mnist.npz")["test_images"][:per_task]
        for i, im in enumerate(imgs):
            Image.fromarray(im).save(out / f"{name}_{i}.png")
        written[name] = imgs
    return written


def train_tiny_run(tmp: Path, method: str = "mola_router", layout: str = "kernel") -> Path:
    """Train one epoch into ``tmp/run-<method>-<layout>`` (reused when it exists) and return the run directory."""
    from mola.cli.main import main

    run = tmp / f"run-{method}-{layout}"
    if (run / "final.json").is_file():
        return run
    data = make_data(tmp / "data")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(
        f"name: tiny\ndata: {{kind: medmnist, root: {data}, channels: 1, batch_size: 32, eval_batch_size: 64}}\n"
        "model: {backbone: {name: small_cnn, width: 4}}\n"
        "train: {epochs: 1, progress: false, tensorboard: false, device: cpu}\n"
    )
    assert main(["train", "--config", str(cfg), "--out", str(run), "--method", method,
                 f"model.mola.layout={layout}"]) == 0
    return run
