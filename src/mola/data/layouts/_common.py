"""Helpers shared by the layouts: seeded stratified splits, caps, lazy file datasets, the scenario builder and
the safe file readers more than one layout uses (IDX, digit CSV, USPS h5, MedMNIST npz/npy)."""

from __future__ import annotations

import gzip
import os
import struct
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mola.data.config import DataConfig
from mola.data.transforms import ImageFileTransform
from mola.tasks import ALL_TASKS, Scenario, TaskDataset, TaskInfo, as_int64

SPLITS = ("train", "val", "test")
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


def present_file(path: Path, what: str = "data file") -> bool:
    """False if nothing is at ``path``; True if it is a regular readable file; else a ValueError naming it and what
    it is (a dangling link, a device, a folder, ...): a data file that is there but unusable is never skipped."""
    if not path.is_symlink() and not path.exists():
        return False
    if path.is_symlink() and not path.exists():
        raise ValueError(f"{what} {str(path)!r} is a link to {os.readlink(path)!r}, which does not exist; fix or "
                         "remove the link")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        target = f" (a link to {str(path.resolve())!r})" if path.is_symlink() else ""
        raise ValueError(f"{what} {str(path)!r}{target} is {kind}; replace it with the data file or remove it")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{what} {str(path)!r} is not readable (permissions); fix its permissions")
    return True


def subdirs(path: Path) -> list[Path]:
    """Visible sub-folders of ``path``, sorted by name."""
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def image_files(path: Path) -> list[Path]:
    """Visible image files directly in ``path`` (by extension, case-insensitive), sorted by name."""
    return sorted(
        p for p in path.iterdir()
        if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and present_file(p, "image file")
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



def multi_input_scenario(name: str, tasks: list[TaskInfo], splits: dict[str, TaskDataset], input_shape: tuple[int, ...],
                         notes: str, extra: dict[str, Any], preprocessing: Any = None) -> Scenario:
    """The one scenario builder of the multi-input layouts: tasks with their own heads, the ``SPLITS`` datasets
    of ``splits``, inputs of ``input_shape`` and (for image inputs) how one image file becomes an input."""
    return Scenario(name=name, heterogeneity="multi_input", tasks=tasks, train=splits["train"], val=splits["val"],
                    test=splits["test"], input_shape=input_shape, shared_head=False, notes=notes, extra=extra,
                    preprocessing=preprocessing)

# -- readers shared by several layouts ----------------------------------------------------------------------
def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a uint8 array; bad magic/size/gzip is a ValueError."""
    require_file(path, "IDX file")
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"cannot read IDX file {str(path)!r}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"IDX file {str(path)!r}: bad magic number (expected unsigned-byte IDX)")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise ValueError(f"IDX file {str(path)!r} is truncated (header)")
    shape = struct.unpack(f">{ndim}I", raw[4:head])
    n = int(np.prod(shape))
    if len(raw) - head != n:
        raise ValueError(
            f"IDX file {str(path)!r}: {len(raw) - head} data bytes, header shape {shape} needs {n}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape).copy()


def read_idx_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 images and (N,) int64 labels from an IDX image/label file pair."""
    x, y = read_idx(images), read_idx(labels).astype(np.int64)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"IDX pair {str(images)!r} {x.shape} / {str(labels)!r} {y.shape} do not match")
    return x, y


def read_digit_csv(path: Path, side: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """(N, side, side) uint8 images and (N,) labels from a csv(.gz): side*side pixels, then the label."""
    require_file(path, "csv file")
    try:
        with _open(path) as f:
            a = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError, gzip.BadGzipFile) as e:
        raise ValueError(f"cannot read csv file {str(path)!r}: {e}") from e
    if a.shape[1] != side * side + 1:
        raise ValueError(f"csv file {str(path)!r}: expected {side * side + 1} columns, got {a.shape[1]}")
    pix = a[:, :-1]
    bad = (pix < 0) | (pix > 255)
    if bad.any():
        i = int(np.flatnonzero(bad.any(axis=1))[0])
        raise ValueError(f"csv file {str(path)!r}: row {i} holds pixel value {pix[i][bad[i]][0]} outside 0..255")
    return pix.astype(np.uint8).reshape(-1, side, side), class_labels(a[:, -1], f"csv file {str(path)!r}")


def read_usps(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 16, 16) float32 images in [0, 1] and (N,) labels from the Kaggle ``usps.h5`` layout."""
    import h5py

    require_file(path, "HDF5 file")
    try:
        with h5py.File(path, "r") as h:
            if split not in h or "data" not in h[split] or "target" not in h[split]:
                raise ValueError(f"HDF5 file {str(path)!r} has no {split}/data and {split}/target")
            where = f"HDF5 file {str(path)!r} split {split!r}"
            x = pixels_to_unit(np.asarray(h[split]["data"]), where).numpy()  # 0..1 as is, 0..255 scaled, else refused
            y = class_labels(np.asarray(h[split]["target"]).reshape(-1), where)
    except OSError as e:
        raise ValueError(f"cannot read HDF5 file {str(path)!r}: {e}") from e
    if x.ndim != 2 or x.shape[1] != 256 or len(x) != len(y):
        raise ValueError(f"HDF5 file {str(path)!r}: {split}/data {x.shape} is not (N, 256) matching target")
    return x.reshape(-1, 16, 16), y


def images_to_tensor(x: np.ndarray, where: str) -> Tensor:
    """(N,H,W) or (N,H,W,C) -> (N,C,H,W) float32 in [-1, 1] (``pixels_to_unit``: uint8/uint16/0..255 scaled)."""
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"{where}: images must be (N,H,W) or (N,H,W,3), got {x.shape}")
    t = pixels_to_unit(x, where).permute(0, 3, 1, 2)
    return (t - 0.5) / 0.5


def read_npz(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (images, labels) from one MedMNIST npz; a corrupt file or missing key is a ValueError."""
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"cannot read npz file {str(path)!r}: {e}") from e
    out = {}
    with f:
        if not hasattr(f, "files"):
            raise ValueError(f"{str(path)!r} is a single array, not an npz archive of images/labels")
        for s in SPLITS:
            arrs = []
            for k in (f"{s}_images", f"{s}_labels"):
                if k not in f.files:
                    raise ValueError(
                        f"npz file {str(path)!r} has no key {k!r} (split {s!r} missing; keys: {f.files})"
                    )
                try:
                    arrs.append(f[k])
                except Exception as e:  # zlib.error, BadZipFile, ValueError, EOFError...
                    raise ValueError(f"cannot read key {k!r} of npz file {str(path)!r}: {e}") from e
            out[s] = (arrs[0], arrs[1])
    return out


def read_npy_folder(path: Path, layout: str = "") -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """split -> (images, labels) for the splits whose images exist in a folder of .npy files; ``layout``: the
    expected layout, shown when there is none."""
    found = {}
    for s in SPLITS:
        ip, lp = path / f"{s}_images.npy", path / f"{s}_labels.npy"
        if not present_file(ip, "npy file"):
            continue
        if not present_file(lp, "npy file"):
            raise ValueError(f"{str(ip)!r} has no matching labels file {str(lp)!r}")
        arrs = []
        for p in (ip, lp):
            try:
                arrs.append(np.load(p, allow_pickle=False))
            except (OSError, ValueError, EOFError) as e:
                raise ValueError(f"cannot read npy file {str(p)!r}: {e}") from e
        found[s] = (arrs[0], arrs[1])
    if not found:
        hint = f"; expected layout:\n{layout}" if layout else ""
        raise ValueError(f"task folder {str(path)!r} has no <split>_images.npy file{hint}")
    return found, list(found)
