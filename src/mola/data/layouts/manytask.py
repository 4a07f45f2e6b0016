"""``manytask``: an 8-task multi-input benchmark built on the fly from the shipped 28 px image sets.

``cfg.root`` is the shipped data folder (``../shared/data``) holding ``medmnist/``, ``digits/`` and
``fashion_mnist/``. Each task has its own inputs and label space (multi-input task heterogeneity); no file is
written. Training sizes are deliberately imbalanced, as in real collections, and CPU-sized (largest 1,000,
smallest breast with 100, 2.7% of the 3,650 training images):

==========  ==============================================  =======  =======  ================================
task        source                                          classes  train    val / test
==========  ==============================================  =======  =======  ================================
fashion     fashion_mnist train / t10k (IDX)                10       1,000    100 / 1,000 (of train / t10k)
notmnist    digits/notmnist_test (IDX; letters A-J)         10       800      100 / 1,000 (re-split, seeded)
mnist       digits/mnist_5k csv / mnist_test t10k           10       600      100 / 1,000 (of csv / t10k)
pneumonia   medmnist/pneumoniamnist_kaggle_variant.npz      2        400      100 / 624 (official val / test)
retina      medmnist/retinamnist.npz                        5        300      100 / 400 (official val / test)
usps        digits/usps/usps.h5 (16 px -> 28 px bilinear)   10       250      100 / 1,000 (of train / test)
derma       medmnist/dermamnist_val_only (re-split)         7        200      100 / 201 (re-split, seeded)
breast      medmnist/breastmnist.npz                        2        100      78 / 156 (official val / test)
==========  ==============================================  =======  =======  ================================

Val comes from each task's official val split where it has one, else a stratified 10% of its training pool,
capped at max(100, 10% of the train size above); test is capped at 1,000. All subsets are seeded by
``cfg.split_seed`` and the task's name, so a task's split does not depend on which other tasks are selected.
Pixels are scaled to [0, 1], then (x - 0.5) / 0.5; gray images are replicated to ``cfg.channels`` (default 3;
RGB -> luminance for 1). ``cfg.tasks`` selects a subset; ``cfg.max_per_task`` / ``cfg.max_eval_per_task`` cap
further.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mola.data.config import DataConfig
from mola.data.layouts._common import (
    cap,
    concat_task_ids,
    images_to_tensor,
    multi_input_scenario,
    name_seed,
    read_digit_csv,
    read_idx_pair,
    read_npy_folder,
    read_npz,
    read_usps,
    require_dir,
    resolve_root,
    select_names,
    stratified_split,
    tree,
)
from mola.data.registry import SCENARIOS
from mola.data.transforms import ResizeTensor, resize_tensor, to_channels
from mola.tasks import ArrayTaskDataset, Scenario, TaskInfo

LAYOUT = tree(
    "<root>/   (the shipped data folder)",
    "  medmnist/breastmnist.npz  pneumoniamnist_kaggle_variant.npz  retinamnist.npz  dermamnist_val_only/",
    "  digits/mnist_5k/mnist_5k.csv.gz  digits/mnist_test/t10k-*  digits/notmnist_test/t10k-*  digits/usps/usps.h5",
    "  fashion_mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz",
)

Splits = dict[str, tuple[np.ndarray, np.ndarray]]
"""split name -> (images (N, H, W[, 3]) uint8 or float in [0, 1], labels (N,) int64); splits may be missing."""


def _npz(name: str) -> Callable[[Path], Splits]:
    return lambda root: read_npz(root / "medmnist" / name)


def _derma(root: Path) -> Splits:
    found, _ = read_npy_folder(root / "medmnist" / "dermamnist_val_only")
    return {"pool": found["val"]}


def _idx(folder: str, stem: str) -> tuple[np.ndarray, np.ndarray]:
    return read_idx_pair(Path(folder) / f"{stem}-images-idx3-ubyte.gz", Path(folder) / f"{stem}-labels-idx1-ubyte.gz")


def _fashion(root: Path) -> Splits:
    return {"train": _idx(str(root / "fashion_mnist"), "train"), "test": _idx(str(root / "fashion_mnist"), "t10k")}


def _notmnist(root: Path) -> Splits:
    return {"pool": _idx(str(root / "digits" / "notmnist_test"), "t10k")}


def _mnist(root: Path) -> Splits:
    return {"train": read_digit_csv(root / "digits" / "mnist_5k" / "mnist_5k.csv.gz"),
            "test": _idx(str(root / "digits" / "mnist_test"), "t10k")}


def _usps(root: Path) -> Splits:
    out = {}
    for s in ("train", "test"):
        x, y = read_usps(root / "digits" / "usps" / "usps.h5", s)
        out[s] = (resize_tensor(torch.from_numpy(x).unsqueeze(1), 28).clamp_(0, 1).squeeze(1).numpy(), y)
    return out


# name -> (reader, classes, training size); eval caps: val 10% of the training size, test 1,000
TASKS: dict[str, tuple[Callable[[Path], Splits], int, int]] = {
    "fashion": (_fashion, 10, 1000),
    "notmnist": (_notmnist, 10, 800),
    "mnist": (_mnist, 10, 600),
    "pneumonia": (_npz("pneumoniamnist_kaggle_variant.npz"), 2, 400),
    "retina": (_npz("retinamnist.npz"), 5, 300),
    "usps": (_usps, 10, 250),
    "derma": (_derma, 7, 200),
    "breast": (_npz("breastmnist.npz"), 2, 100),
}
TEST_CAP = 1000


def _unit(x: np.ndarray, where: str) -> Tensor:
    """(N, 28, 28[, 3]) images -> (N, C, 28, 28) in [-1, 1], as MedMNIST's (every shipped set here is 28 px)."""
    if x.shape[1:3] != (28, 28):
        raise ValueError(f"{where}: images must be (N, 28, 28) or (N, 28, 28, 3), got {x.shape}")
    return images_to_tensor(x, where)


def _task_splits(name: str, data: Splits, train_size: int, cfg: DataConfig) -> dict[str, np.ndarray]:
    """Seeded index arrays for train/val/test into ``data``'s arrays ("pool" is split three ways)."""
    rng = name_seed(cfg.split_seed, f"manytask/{name}")
    n_val = max(100, train_size // 10)
    if "pool" in data:
        y = data["pool"][1]
        tr, va, te = stratified_split(y, cfg.val_fraction, cfg.test_fraction, rng)
        idx = {"train": tr, "val": va, "test": te}
    elif "val" in data:
        idx = {s: np.arange(len(data[s][1])) for s in ("train", "val", "test")}
    else:
        tr, va, _ = stratified_split(data["train"][1], cfg.val_fraction, 0.0, rng)
        idx = {"train": tr, "val": va, "test": np.arange(len(data["test"][1]))}
    limit = train_size if cfg.max_per_task is None else min(train_size, cfg.max_per_task)
    eval_caps = {"val": n_val, "test": TEST_CAP}
    if cfg.max_eval_per_task is not None:
        eval_caps = {s: min(c, cfg.max_eval_per_task) for s, c in eval_caps.items()}
    return {"train": cap(idx["train"], limit, rng), "val": cap(idx["val"], eval_caps["val"], rng),
            "test": cap(idx["test"], eval_caps["test"], rng)}


@SCENARIOS.register("manytask")
def build_manytask(cfg: DataConfig) -> Scenario:
    """Eight shipped 28 px image sets as eight multi-input tasks with imbalanced training sizes."""
    root = resolve_root(cfg.root)
    require_dir(root, LAYOUT)
    names = select_names(cfg.tasks, list(TASKS), "manytask task", root)
    channels = cfg.channels or 3
    blocks: dict[str, list[tuple[Tensor, np.ndarray]]] = {"train": [], "val": [], "test": []}
    infos = []
    for name in names:
        reader, ncls, size = TASKS[name]
        data = {s: (x, np.asarray(y).reshape(-1).astype(np.int64)) for s, (x, y) in reader(root).items()}
        idx = _task_splits(name, data, size, cfg)
        for split, rows in idx.items():
            src = "pool" if "pool" in data else split if split in data else "train"
            x, y = data[src][0][rows], data[src][1][rows]
            where = f"manytask task {name!r} ({split}, from {src})"
            if len(y) and (y.min() < 0 or y.max() >= ncls):
                raise ValueError(f"{where}: labels must be in 0..{ncls - 1}, got {y.min()}..{y.max()}")
            blocks[split].append((to_channels(_unit(x, where), channels), y))
        infos.append(TaskInfo(name, "classification", ncls))
    size = cfg.image_size or 28
    tf = ResizeTensor(size) if size != 28 else None
    ds = {}
    for split, parts in blocks.items():
        xs = torch.cat([p[0] for p in parts])
        ys = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        ds[split] = ArrayTaskDataset(xs, ys, concat_task_ids([len(p[1]) for p in parts]), tf)
    counts = [len(p[1]) for p in blocks["train"]]
    return multi_input_scenario(
        "manytask", infos, ds, (channels, size, size),
        notes=(f"manytask from {str(root)!r}: {', '.join(f'{n} {c}' for n, c in zip(names, counts, strict=True))} "
               f"training images (split seed {cfg.split_seed}); pixels /255 then (x-0.5)/0.5; {channels} channel(s)"),
        extra={"root": str(root)},
    )
