"""``office_caltech10``: Office-Caltech10 precomputed features in .mat files (domain heterogeneity).

``cfg.feature`` picks the feature set (``root/<feature>/``):

- ``surf``: 800-bin SURF bag-of-words histograms, key ``fts``, files ``<domain>_SURF_L10.mat``
  (``Caltech10_SURF_L10.mat`` for caltech); domains amazon, caltech, dslr, webcam.
- ``decaf6``: 4096-d DeCAF fc6 activations, key ``feas``, files ``<domain>.mat`` (only dslr, webcam ship).

Labels 1..10 become 0..9 (one shared 10-class head). Normalisation: each vector is scaled to unit L1 norm
(SURF: counts -> word frequencies) or unit L2 norm (DeCAF), then every dimension is z-scored with the mean
and std of the pooled *training* split of the selected domains (stored in ``Scenario.extra``), so no val/test
statistics leak. Default domains: those of the four whose file exists (at least one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
import torch

from mola.data.config import DataConfig
from mola.data.layouts._common import (
    cap_splits,
    class_labels,
    concat_task_ids,
    name_seed,
    present_file,
    require_dir,
    require_file,
    resolve_root,
    stratified_split,
    tree,
)
from mola.data.registry import SCENARIOS
from mola.tasks import ArrayTaskDataset, Scenario, TaskInfo

DOMAINS = ("amazon", "caltech", "dslr", "webcam")
FEATURES: dict[str, dict[str, Any]] = {
    "surf": {"key": "fts", "dim": 800, "norm": 1,
             "file": lambda d: "Caltech10_SURF_L10.mat" if d == "caltech" else f"{d}_SURF_L10.mat"},
    "decaf6": {"key": "feas", "dim": 4096, "norm": 2, "file": lambda d: f"{d}.mat"},
}
NUM_CLASSES = 10

LAYOUT = tree(
    "<root>/",
    "  surf/     amazon_SURF_L10.mat  Caltech10_SURF_L10.mat  dslr_SURF_L10.mat  webcam_SURF_L10.mat",
    "  decaf6/   amazon.mat  caltech.mat  dslr.mat  webcam.mat",
)


def read_mat(path: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, D) float64 and labels (N,) int64 (as stored, 1..10) from one .mat file."""
    require_file(path, ".mat file")
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as e:  # scipy raises many types (ValueError, TypeError, MatReadError, OSError, ...)
        raise ValueError(f"cannot read .mat file {str(path)!r}: {type(e).__name__}: {e}") from e
    for k in (key, "labels"):
        if k not in mat:
            found = [n for n in mat if not n.startswith("__")]
            raise ValueError(f".mat file {str(path)!r} has no key {k!r} (keys: {found})")
    x = np.asarray(mat[key], dtype=np.float64)
    y = class_labels(np.asarray(mat["labels"]).reshape(-1), f".mat file {str(path)!r}")  # 1.5 is refused, not cut
    if x.ndim == 2 and not np.isfinite(x).all():
        i = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise ValueError(f".mat file {str(path)!r}: {key!r} row {i} holds NaN or inf features")
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f".mat file {str(path)!r}: {key!r} {x.shape} does not match labels ({len(y)},)")
    if len(y) and (y.min() < 1 or y.max() > NUM_CLASSES):
        raise ValueError(
            f".mat file {str(path)!r}: labels must be in 1..{NUM_CLASSES}, got {y.min()}..{y.max()}"
        )
    return x, y - 1


@SCENARIOS.register("office_caltech10")
def build_office_caltech10(cfg: DataConfig) -> Scenario:
    """Office-Caltech10 SURF or DeCAF6 features -> a domain-heterogeneity Scenario of (D,) vectors."""
    if cfg.feature not in FEATURES:
        raise ValueError(f"unknown office_caltech10 feature {cfg.feature!r}; accepted: {', '.join(FEATURES)}")
    spec = FEATURES[cfg.feature]
    root = resolve_root(cfg.root)
    folder = root / cfg.feature
    require_dir(folder, LAYOUT)
    if cfg.domains is not None:
        bad = [d for d in cfg.domains if d not in DOMAINS]
        if bad:
            raise ValueError(f"unknown office_caltech10 domain(s) {bad}; accepted: {', '.join(DOMAINS)}")
        domains = list(cfg.domains)
    else:
        domains = [d for d in DOMAINS if present_file(folder / spec["file"](d), "feature file")]
        if not domains:
            expected = ", ".join(str(folder / spec["file"](d)) for d in DOMAINS)
            raise FileNotFoundError(f"no {cfg.feature} feature file found; expected any of: {expected}")

    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "val": [], "test": []}
    for d in domains:
        path = folder / spec["file"](d)
        x, y = read_mat(path, spec["key"])
        if x.shape[1] != spec["dim"]:
            raise ValueError(
                f".mat file {str(path)!r}: expected {spec['dim']}-d {cfg.feature} features, got {x.shape}"
            )
        norm = np.linalg.norm(x, ord=spec["norm"], axis=1, keepdims=True)
        x = x / np.maximum(norm, 1e-12)
        rng = name_seed(cfg.split_seed, d)
        tr, va, te = stratified_split(y, cfg.val_fraction, cfg.test_fraction, rng)
        idx = cap_splits({"train": tr, "val": va, "test": te}, cfg, rng)
        for s in parts:
            parts[s].append((x[idx[s]], y[idx[s]]))

    train_x = np.concatenate([p[0] for p in parts["train"]])
    mean = train_x.mean(axis=0)
    std = train_x.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)
    ds = {}
    for s, blocks in parts.items():
        x = np.concatenate([b[0] for b in blocks])
        y = np.concatenate([b[1] for b in blocks])
        xs = torch.from_numpy(((x - mean) / std).astype(np.float32))
        ds[s] = ArrayTaskDataset(xs, torch.from_numpy(y), concat_task_ids([len(b[1]) for b in blocks]))
    norm_name = "L1" if spec["norm"] == 1 else "L2"
    return Scenario(
        name=f"office_caltech10-{cfg.feature}",
        heterogeneity="domain",
        tasks=[TaskInfo(d, "classification", NUM_CLASSES) for d in domains],
        train=ds["train"],
        val=ds["val"],
        test=ds["test"],
        input_shape=(spec["dim"],),
        shared_head=True,
        notes=(
            f"Office-Caltech10 {cfg.feature} features from {str(folder)!r}; labels 1..10 -> 0..9; each "
            f"vector {norm_name}-normalised, then z-scored per dimension with pooled train statistics; "
            f"per-domain seeded stratified split val={cfg.val_fraction} test={cfg.test_fraction} seed={cfg.split_seed}."
        ),
        extra={
            "feature_mean": mean.astype(np.float32),
            "feature_std": std.astype(np.float32),
            "root": str(root),
        },
    )
