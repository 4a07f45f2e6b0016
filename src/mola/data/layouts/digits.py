"""``digits``: handwritten-digit domains sharing the 10 classes 0..9 (domain heterogeneity).

Files under ``cfg.root`` (the shipped ``digits/`` folder):

- ``mnist``: train = ``mnist_5k/mnist_5k.csv.gz`` (5000 rows: 784 pixels 0..255, label last, no header),
  test = ``mnist_test/t10k-{images-idx3,labels-idx1}-ubyte.gz`` (IDX, official MNIST test set);
- ``usps``: ``usps/usps.h5`` (``train|test/data`` (N, 256) in [0, 1], ``train|test/target``), 16x16 upsampled
  bilinearly to 28x28; official train/test split.

Val is carved from each domain's train split (seeded, stratified, ``cfg.val_fraction``). Pixels are scaled to
[0, 1], then standardised with one mean/std pooled over the selected train splits (in ``Scenario.extra``).
``cfg.max_per_task`` / ``cfg.max_eval_per_task`` cap train / val+test per domain; ``cfg.image_size`` resizes
lazily per item; ``cfg.channels=3`` replicates the gray channel.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mola.data.config import DataConfig
from mola.data.layouts._common import (  # the readers live there: manytask uses them too
    cap,
    concat_task_ids,
    name_seed,
    pixels_to_unit,
    read_digit_csv,
    read_idx_pair,
    read_usps,
    require_dir,
    resolve_root,
    select_names,
    stratified_split,
    tree,
)
from mola.data.preprocess import ImagePreprocessing
from mola.data.registry import SCENARIOS
from mola.data.transforms import ResizeTensor, resize_tensor, to_channels
from mola.tasks import ArrayTaskDataset, Scenario, TaskInfo

LAYOUT = tree(
    "<root>/",
    "  mnist_5k/mnist_5k.csv.gz",
    "  mnist_test/t10k-images-idx3-ubyte.gz  t10k-labels-idx1-ubyte.gz",
    "  usps/usps.h5                          train/{data,target}  test/{data,target}",
)


def _as_unit(x: np.ndarray, where: str = "digit images") -> Tensor:
    """(N, H, W) images -> (N, 1, H, W) float32 in [0, 1] (``pixels_to_unit``: NaN or out-of-range values are
    refused, never clamped)."""
    return pixels_to_unit(x, where).unsqueeze(1)


def load_mnist(root: Path) -> dict[str, tuple[Tensor, np.ndarray]]:
    """MNIST domain: mnist_5k csv as train, t10k IDX as test; images (N, 1, 28, 28) in [0, 1]."""
    xtr, ytr = read_digit_csv(root / "mnist_5k" / "mnist_5k.csv.gz")
    xte, yte = read_idx_pair(root / "mnist_test" / "t10k-images-idx3-ubyte.gz",
                             root / "mnist_test" / "t10k-labels-idx1-ubyte.gz")
    return {"train": (_as_unit(xtr), ytr), "test": (_as_unit(xte), yte)}


def load_usps(root: Path) -> dict[str, tuple[Tensor, np.ndarray]]:
    """USPS domain: official train/test, 16x16 upsampled to (N, 1, 28, 28) in [0, 1]."""
    out = {}
    for s in ("train", "test"):
        x, y = read_usps(root / "usps" / "usps.h5", s)
        # the clamp only trims the resize's overshoot: read_usps checked the raw values (docs/reliability.md)
        out[s] = (resize_tensor(_as_unit(x), 28).clamp_(0, 1), y)
    return out


DOMAIN_LOADERS: dict[str, Callable[[Path], dict[str, tuple[Tensor, np.ndarray]]]] = {
    "mnist": load_mnist, "usps": load_usps,
}


def standardized_datasets(parts: dict[str, list[tuple[Tensor, np.ndarray]]],
                          cfg: DataConfig) -> tuple[dict[str, ArrayTaskDataset], float, float]:
    """Per-split datasets of per-domain (images in [0, 1], labels) blocks, standardised with the pooled training
    mean/std, in ``cfg.channels`` (default 1) and resized to ``cfg.image_size`` (default 28); and that mean/std."""
    train_x = torch.cat([p[0] for p in parts["train"]])
    mean, std = float(train_x.mean()), float(train_x.std().clamp_min(1e-6))
    channels = cfg.channels or 1
    size = cfg.image_size or 28
    ds = {}
    for split, blocks in parts.items():
        x = to_channels((torch.cat([b[0] for b in blocks]) - mean) / std, channels)
        y = torch.from_numpy(np.concatenate([b[1] for b in blocks]))
        ds[split] = ArrayTaskDataset(x, y, concat_task_ids([len(b[1]) for b in blocks]),
                                     transform=ResizeTensor(size) if size != 28 else None)
    return ds, mean, std


@SCENARIOS.register("digits")
def build_digits(cfg: DataConfig) -> Scenario:
    """MNIST / USPS digit domains -> a domain-heterogeneity Scenario of (1, 28, 28) images."""
    root = resolve_root(cfg.root)
    require_dir(root, LAYOUT)
    domains = select_names(cfg.domains, list(DOMAIN_LOADERS), "digits domain", root)
    parts: dict[str, list[tuple[Tensor, np.ndarray]]] = {"train": [], "val": [], "test": []}
    for d in domains:
        data = DOMAIN_LOADERS[d](root)
        for s, (_, y) in data.items():
            if len(y) and (y.min() < 0 or y.max() > 9):
                raise ValueError(f"digits domain {d!r} {s}: labels must be 0..9, got {y.min()}..{y.max()}")
        rng = name_seed(cfg.split_seed, d)
        xtr, ytr = data["train"]
        tr, va, _ = stratified_split(ytr, cfg.val_fraction, 0.0, rng)
        tr, va = cap(tr, cfg.max_per_task, rng), cap(va, cfg.max_eval_per_task, rng)
        xte, yte = data["test"]
        te = cap(np.arange(len(yte)), cfg.max_eval_per_task, rng)
        parts["train"].append((xtr[tr], ytr[tr]))
        parts["val"].append((xtr[va], ytr[va]))
        parts["test"].append((xte[te], yte[te]))

    ds, mean, std = standardized_datasets(parts, cfg)
    channels = cfg.channels or 1
    size = cfg.image_size or 28
    return Scenario(
        name="digits",
        heterogeneity="domain",
        tasks=[TaskInfo(d, "classification", 10) for d in domains],
        train=ds["train"],
        val=ds["val"],
        test=ds["test"],
        input_shape=(channels, size, size),
        shared_head=True,
        notes=(
            "Digit domains: mnist (train = mnist_5k csv, test = official t10k), usps (official split, "
            f"16x16 -> 28x28 bilinear). Val = {cfg.val_fraction} of each train split (seeded, stratified, "
            f"seed {cfg.split_seed}). Pixels in [0,1] standardised with pooled train mean {mean:.4f} / "
            f"std {std:.4f}."
        ),
        extra={"mean": mean, "std": std, "root": str(root)},
        preprocessing=ImagePreprocessing.normalized((channels, size, size), mean, std),
    )
