"""Helpers shared by the layouts: seeded stratified splits, caps, lazy file datasets and safe file readers."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mola.data.base import ALL_TASKS, TaskDataset, as_int64
from mola.data.config import DataConfig
from mola.data.transforms import ImageFileTransform

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


# ----------------------------------------------------------------------------------------------- paths
def resolve_root(root: str | Path) -> Path:
    """``root`` as a Path (relative paths are relative to the working directory, i.e. the repo root)."""
    return Path(root).expanduser()


def require_dir(path: Path, layout: str) -> None:
    """Raise FileNotFoundError naming ``path`` and showing the expected ``layout`` if it is not a folder."""
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(f"data folder {str(path)!r} {what}; expected layout:\n{layout}")


def require_file(path: Path, what: str = "data file") -> None:
    """Raise FileNotFoundError naming ``path`` if it is not a file."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} not found")


def subdirs(path: Path) -> list[Path]:
    """Visible sub-folders of ``path``, sorted by name."""
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def image_files(path: Path) -> list[Path]:
    """Visible image files directly in ``path`` (by extension, case-insensitive), sorted by name."""
    return sorted(
        p for p in path.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def select_names(
    requested: Sequence[str] | None, available: Sequence[str], what: str, where: Path
) -> list[str]:
    """``requested`` (checked against ``available``) or all ``available``; unknown names: ValueError."""
    if requested is None:
        return list(available)
    unknown = [n for n in requested if n not in available]
    if unknown:
        raise ValueError(
            f"unknown {what} {', '.join(map(repr, unknown))} in {str(where)!r}; "
            f"available: {', '.join(available)}"
        )
    if len(set(requested)) != len(requested):
        raise ValueError(f"duplicate {what} in {list(requested)}")
    return list(requested)


# ---------------------------------------------------------------------------------------------- splits
def name_seed(seed: int, name: str) -> np.random.Generator:
    """A generator seeded by ``seed`` and a stable hash of ``name``: one task's split ignores the others."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) sizes: val/test = floor(n * fraction + 0.5), train = the rest."""
    for f, nm in ((val_fraction, "val_fraction"), (test_fraction, "test_fraction")):
        if not 0.0 <= f < 1.0:
            raise ValueError(f"{nm} must be in [0, 1), got {f}")
    n_test = int(np.floor(n * test_fraction + 0.5))
    n_val = int(np.floor(n * val_fraction + 0.5))
    return n - n_val - n_test, n_val, n_test


def _spread(n: int, k: int) -> np.ndarray:
    """``k`` positions spread evenly over ``range(n)``."""
    return (np.arange(k) * n) // k if k else np.zeros(0, dtype=np.int64)


def stratified_split(
    labels: np.ndarray | None, val_fraction: float, test_fraction: float, rng: np.random.Generator,
    n: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded train/val/test index arrays (each sorted) with exact ``split_sizes`` totals.

    Samples are grouped by label (random order within a class) and val/test positions are spread evenly
    over that order, so every class gets its proportional share (+-1). ``labels=None`` gives a plain split.
    """
    if labels is None:
        assert n is not None
        order = rng.permutation(n)
    else:
        labels = np.asarray(labels)
        n = len(labels)
        perm = rng.permutation(n)
        order = perm[np.argsort(labels[perm], kind="stable")]
    n_train, n_val, n_test = split_sizes(n, val_fraction, test_fraction)
    if n_train < 1:
        raise ValueError(f"split of {n} samples leaves no training sample (val {n_val}, test {n_test})")
    mask = np.ones(n, dtype=bool)
    test_pos = _spread(n, n_test)
    mask[test_pos] = False
    rest = np.flatnonzero(mask)
    val_pos = rest[_spread(len(rest), n_val)]
    mask[val_pos] = False
    return np.sort(order[mask]), np.sort(order[val_pos]), np.sort(order[test_pos])


def cap(indices: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """At most ``limit`` of ``indices`` (a seeded random subset, kept in sorted order)."""
    if limit is None or len(indices) <= limit:
        return indices
    if limit < 1:
        raise ValueError(f"max_per_task / max_eval_per_task must be >= 1, got {limit}")
    return np.sort(rng.choice(indices, size=limit, replace=False))


def cap_splits(
    splits: dict[str, np.ndarray], cfg: DataConfig, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Apply ``cfg.max_per_task`` to "train" and ``cfg.max_eval_per_task`` to "val"/"test"."""
    limits = {"train": cfg.max_per_task, "val": cfg.max_eval_per_task, "test": cfg.max_eval_per_task}
    return {s: cap(idx, limits[s], rng) for s, idx in splits.items()}


# -------------------------------------------------------------------------------------------- values
MAX_CLASSES = 100_000
"""Largest class count a label file may imply (a label of 10**9 would allocate a head of 10**9 outputs)."""


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))[0])


def pixels_to_unit(x: np.ndarray, where: str) -> Tensor:
    """Image array -> float32 tensor in [0, 1], by the value range of its dtype (docs/reliability.md):
    uint8 / 255, uint16 / 65535, other integers and floats by their values: within [0, 1] as is, within
    [0, 255] / 255, within [0, 65535] (integers) / 65535. NaN/inf pixels, or values outside these ranges, are a
    ValueError naming ``where`` (file and split) and the first bad sample's index."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x)).float() / 255.0
    if x.dtype == np.uint16:
        return torch.from_numpy(x.astype(np.float32) / 65535.0)
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"{where}: images must be numbers, got dtype {x.dtype}")
    if not len(x):
        return torch.from_numpy(x.astype(np.float32))
    if np.issubdtype(x.dtype, np.floating):
        bad = ~np.isfinite(x)
        if bad.any():
            i = _first_bad(bad)
            raise ValueError(f"{where}: image at index {i} holds NaN or inf pixels")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0:
        i = _first_bad(x < 0)
        raise ValueError(f"{where}: pixel value {lo:g} at index {i} is negative; images must hold values in "
                         "[0, 1] or [0, 255] (or an unsigned integer dtype)")
    if hi <= 1.0:
        return torch.from_numpy(x.astype(np.float32))
    if hi <= 255.0:
        return torch.from_numpy(x.astype(np.float32) / 255.0)
    if np.issubdtype(x.dtype, np.integer) and hi <= 65535:
        return torch.from_numpy(x.astype(np.float32) / 65535.0)
    i = _first_bad(x > (65535 if np.issubdtype(x.dtype, np.integer) else 255))
    raise ValueError(f"{where}: pixel value {hi:g} at index {i} is outside the accepted ranges [0, 1], [0, 255]"
                     + (" and [0, 65535]" if np.issubdtype(x.dtype, np.integer) else " (float images)"))


def class_labels(y: np.ndarray, where: str) -> np.ndarray:
    """Labels -> int64 class indices; fractional, NaN, negative or absurdly large (> MAX_CLASSES) labels are a
    ValueError naming ``where`` and the first bad index (labels are never rounded or truncated)."""
    try:
        out = as_int64(y, "labels")
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    if len(out):
        bad = (out < 0) | (out >= MAX_CLASSES)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{where}: label {out[i]} at index {i} is not a class index 0..{MAX_CLASSES - 1} "
                             "(labels must be 0..C-1)")
    return out


def read_image_headers(paths: Sequence[str | Path]) -> list[tuple[str, tuple[int, int]]]:
    """Open every image file's header and run PIL's ``verify`` (no full decode): a truncated, corrupt or
    decompression-bomb file is a ValueError naming it when the layout is read, not in epoch 3. Returns each
    file's PIL mode and (width, height), for the channel and size rules and the dry-run summary."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                w, h = im.size
                if w * h > (Image.MAX_IMAGE_PIXELS or float("inf")):
                    raise ValueError(f"{w}x{h} pixels, above the decompression-bomb limit of "
                                     f"{Image.MAX_IMAGE_PIXELS} (PIL.Image.MAX_IMAGE_PIXELS)")
                out.append((im.mode, (w, h)))
                im.verify()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image file {str(p)!r}: {e}") from e
    return out


def verify_image_files(paths: Sequence[str | Path]) -> None:
    """``read_image_headers`` without its result: every file is checked when the layout is read."""
    read_image_headers(paths)


# ------------------------------------------------------------------------------------------- datasets
class ImageFileDataset(TaskDataset):
    """Lazy image-file dataset: a path, label and task id per sample; images are read in ``__getitem__``."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[int],
        task_ids: Sequence[int],
        transform: ImageFileTransform,
    ) -> None:
        if not (len(paths) == len(labels) == len(task_ids)):
            raise ValueError("paths, labels and task ids differ in length")
        self.paths = [str(p) for p in paths]
        self.labels = as_int64(labels, "labels")
        self.task_ids = as_int64(task_ids, "task ids")
        self.transform = transform

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        x = self.transform(self.paths[i])
        return x, torch.tensor(self.labels[i], dtype=torch.long), int(self.task_ids[i])


class ArrayMultiTargetDataset(TaskDataset):
    """In-memory single-input dataset: inputs (N, ...) float32 and a dict of per-task target arrays (N, ...).

    Items are ``(x, {task: target}, ALL_TASKS)``; integer targets come back as int64 (stored compactly).
    """

    def __init__(self, inputs: Tensor, targets: dict[str, Tensor], transform: Any = None) -> None:
        for k, v in targets.items():
            if len(v) != len(inputs):
                raise ValueError(f"target {k!r} has {len(v)} rows, inputs {len(inputs)}")
        self.inputs = inputs
        self.targets = targets
        self.transform = transform
        self.task_ids = np.full(len(inputs), ALL_TASKS, dtype=np.int64)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor], int]:
        x = self.inputs[i]
        if self.transform is not None:
            x = self.transform(x)
        out = {}
        for k, v in self.targets.items():
            t = v[i]
            out[k] = t.long() if not t.is_floating_point() else t
        return x, out, ALL_TASKS


def concat_task_ids(counts: Sequence[int]) -> np.ndarray:
    """Task ids 0..T-1 repeated ``counts[t]`` times (per-task blocks in order)."""
    return np.repeat(np.arange(len(counts), dtype=np.int64), counts)


def tree(*lines: str) -> str:
    """Indent an expected-layout drawing for error messages."""
    return "\n".join("  " + ln for ln in lines)
