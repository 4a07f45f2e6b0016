"""``multidigit``: a DERIVED single-input multi-task set made of two MNIST digits side by side.

How it is made (``cfg.root`` = the shipped ``digits/`` folder): the mnist_5k images are split (seeded,
stratified, ``cfg.val_fraction``) into a train pool and a val pool; t10k is the test pool. In each pool the
images are put in a seeded random order p and composite k is ``[p[k] | p[k+1 mod M]]`` (1x28x56), so every
image appears once on the left and once on the right and never next to itself; a pool of M images gives M
composites. Tasks: ``left`` and ``right`` (10-class digit labels) and ``segmentation`` (per pixel 0
background, 1 left-digit ink, 2 right-digit ink; ink = pixel > 0.5 after scaling to [0, 1]). Inputs are
standardised with the MNIST mean/std (0.1307, 0.3081). ``cfg.max_per_task`` caps train composites,
``cfg.max_eval_per_task`` val/test composites; ``cfg.tasks`` may select a subset of the three tasks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mola.data.config import DataConfig
from mola.data.layouts._common import (
    ArrayMultiTargetDataset,
    cap,
    name_seed,
    require_dir,
    resolve_root,
    stratified_split,
)
from mola.data.layouts.digits import LAYOUT, load_mnist
from mola.data.preprocess import ImagePreprocessing
from mola.data.registry import SCENARIOS
from mola.tasks import Scenario, TaskInfo

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
INK = 0.5
TASK_INFOS = {
    "left": ("classification", 10),
    "right": ("classification", 10),
    "segmentation": ("segmentation", 3),
}


def compose(images: Tensor, labels: np.ndarray, rng: np.random.Generator) -> tuple[Tensor, dict[str, Tensor]]:
    """Pair (M, 1, 28, 28) images in [0, 1] into M side-by-side composites (raw [0,1] inputs, targets)."""
    m = len(images)
    order = torch.from_numpy(rng.permutation(m))
    left, right = order, torch.roll(order, -1)
    x = torch.cat([images[left], images[right]], dim=-1)  # (M, 1, 28, 56)
    w = images.shape[-1]
    seg = torch.zeros(m, x.shape[-2], x.shape[-1], dtype=torch.uint8)
    seg[:, :, :w][x[:, 0, :, :w] > INK] = 1
    seg[:, :, w:][x[:, 0, :, w:] > INK] = 2
    lab = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return x, {"left": lab[left], "right": lab[right], "segmentation": seg}


@SCENARIOS.register("multidigit")
def build_multidigit(cfg: DataConfig) -> Scenario:
    """Two-digit MNIST composites -> a derived single-input Scenario (left, right, segmentation)."""
    root = resolve_root(cfg.root)
    require_dir(root, LAYOUT)
    if cfg.tasks is None:
        tasks = list(TASK_INFOS)
    else:
        bad = [t for t in cfg.tasks if t not in TASK_INFOS]
        if bad or not cfg.tasks:
            raise ValueError(f"unknown multidigit task(s) {bad}; accepted: {', '.join(TASK_INFOS)}")
        tasks = [t for t in TASK_INFOS if t in cfg.tasks]
    data = load_mnist(root)
    rng = name_seed(cfg.split_seed, "multidigit")
    xtr, ytr = data["train"]
    tr, va, _ = stratified_split(ytr, cfg.val_fraction, 0.0, rng)
    xte, yte = data["test"]
    pools = {"train": (xtr[tr], ytr[tr]), "val": (xtr[va], ytr[va]), "test": (xte, yte)}
    ds = {}
    for s, (x, y) in pools.items():
        if len(y) < 2:
            raise ValueError(f"multidigit {s} pool has {len(y)} image(s); at least 2 are needed for pairs")
        comp, targets = compose(x, y, rng)
        keep = cap(np.arange(len(comp)), cfg.max_per_task if s == "train" else cfg.max_eval_per_task, rng)
        keep_t = torch.from_numpy(keep)
        inputs = ((comp[keep_t] - MNIST_MEAN) / MNIST_STD).contiguous()
        ds[s] = ArrayMultiTargetDataset(inputs, {t: targets[t][keep_t] for t in tasks})
    return Scenario(
        name="multidigit",
        heterogeneity="single_input",
        tasks=[TaskInfo(t, TASK_INFOS[t][0], TASK_INFOS[t][1]) for t in tasks],  # type: ignore[arg-type]
        train=ds["train"],
        val=ds["val"],
        test=ds["test"],
        input_shape=(1, 28, 56),
        shared_head=False,
        derived=True,
        notes=(
            "DERIVED from MNIST: two digits side by side (1x28x56); train/val composites from mnist_5k "
            f"(val = {cfg.val_fraction}, seeded stratified split, seed {cfg.split_seed}), test from t10k; "
            "seeded pairing "
            "[p[k] | p[k+1]] so each image is used once per side; tasks left/right digit (10 classes) and "
            "segmentation (0 background, 1 left ink, 2 right ink; ink = pixel > 0.5 in [0,1]); inputs "
            "standardised with MNIST mean 0.1307 / std 0.3081."
        ),
        extra={"root": str(root)},
        preprocessing=ImagePreprocessing.normalized((1, 28, 56), MNIST_MEAN, MNIST_STD),
    )
