"""Tiny generated datasets in the real on-disk formats of each mola data layout (for tests)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def shared_dir(name: str) -> Path:
    """Path of a shipped data folder (tests skip when it is absent)."""
    return (SHARED / name).resolve()


def write_png(path: Path, rng: np.random.Generator, size: tuple[int, int] = (20, 16), mode: str = "RGB") -> None:
    """A random PNG image of ``size`` (w, h)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def make_image_tree(root: Path, groups: dict[str, dict[str, int]], seed: int = 0, mode: str = "RGB") -> Path:
    """``root/<group>/<class>/<i>.png`` with ``groups[group][class]`` images each."""
    rng = np.random.default_rng(seed)
    for g, classes in groups.items():
        for c, n in classes.items():
            (root / g / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                write_png(root / g / c / f"{i:03d}.png", rng, mode=mode)
    return root


COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def make_task_folders(root: Path, n: int = 6, seed: int = 0) -> Path:
    """Three tasks in the ``tasks`` layout: ``colors`` (RGB, the class is the colour: gray would lose it),
    ``shapes`` (RGB, its own train/val/test folders) and ``xray`` (gray, another image size)."""
    rng = np.random.default_rng(seed)
    for c, rgb in COLOURS.items():
        for i in range(n):
            px = np.clip(np.array(rgb) + rng.integers(-20, 21, (12, 12, 3)), 0, 255).astype(np.uint8)
            (root / "colors" / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(px, "RGB").save(root / "colors" / c / f"{i:03d}.png")
    for split, k in (("train", n), ("val", 2), ("test", 2)):
        for c in ("circle", "square"):
            for i in range(k):
                write_png(root / "shapes" / split / c / f"{i:03d}.png", rng, size=(12, 12))
    for c in ("normal", "opaque"):
        for i in range(n):
            write_png(root / "xray" / c / f"{i:03d}.png", rng, size=(16, 16), mode="L")
    return root


def truncate(path: Path, keep: int = 40) -> None:
    """Cut a file down to its first ``keep`` bytes (a corrupt file)."""
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def make_npz(
    path: Path, sizes: tuple[int, int, int], num_classes: int, rgb: bool = False, flat_labels: bool = False,
    seed: int = 0, drop: tuple[str, ...] = (),
) -> Path:
    """A MedMNIST-style npz with ``{train,val,test}_{images,labels}`` (keys in ``drop`` left out)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        shape = (n, 28, 28, 3) if rgb else (n, 28, 28)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        labels = np.arange(n) % num_classes
        arrays[f"{split}_labels"] = labels.astype(np.uint8) if flat_labels else labels.reshape(-1, 1).astype(np.uint8)
    for k in drop:
        arrays.pop(k)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def make_val_only_folder(folder: Path, n: int, num_classes: int, seed: int = 0) -> Path:
    """A dermamnist_val_only-style folder: val images + labels, train/test labels only."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "val_images.npy", rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8))
    np.save(folder / "val_labels.npy", (np.arange(n) % num_classes).reshape(-1, 1).astype(np.uint8))
    np.save(folder / "train_labels.npy", np.zeros((3 * n, 1), dtype=np.uint8))
    np.save(folder / "test_labels.npy", np.zeros((n, 1), dtype=np.uint8))
    return folder


def make_office(root: Path, feature: str, counts: dict[str, int], seed: int = 0) -> Path:
    """Office-Caltech10 .mat files (SURF 'fts' uint8 800-d or DeCAF 'feas' float 4096-d), labels 1..10."""
    import scipy.io

    rng = np.random.default_rng(seed)
    folder = root / feature
    folder.mkdir(parents=True, exist_ok=True)
    for d, n in counts.items():
        labels = (np.arange(n) % 10 + 1).reshape(-1, 1).astype(np.uint8)
        if feature == "surf":
            name = "Caltech10_SURF_L10.mat" if d == "caltech" else f"{d}_SURF_L10.mat"
            scipy.io.savemat(folder / name, {"fts": rng.integers(0, 20, (n, 800)).astype(np.uint8), "labels": labels})
        else:
            scipy.io.savemat(folder / f"{d}.mat", {"feas": rng.random((n, 4096)) * 5, "labels": labels})
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped IDX file."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def digit_images(n: int, rng: np.random.Generator, side: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Fake digit images: a bright bar whose column depends on the label, on a dark background."""
    y = np.arange(n) % 10
    x = np.zeros((n, side, side), dtype=np.uint8)
    for i, lab in enumerate(y):
        c = 2 + lab * (side - 6) // 10
        x[i, side // 4: 3 * side // 4, c: c + 3] = 200 + rng.integers(0, 55)
    return x, y


def make_digits(root: Path, n_train: int = 60, n_test: int = 30, n_usps: tuple[int, int] = (50, 20)) -> Path:
    """The shipped digits layout: mnist_5k csv.gz, t10k IDX .gz and usps.h5."""
    import h5py

    rng = np.random.default_rng(0)
    (root / "mnist_5k").mkdir(parents=True, exist_ok=True)
    (root / "mnist_test").mkdir(parents=True, exist_ok=True)
    (root / "usps").mkdir(parents=True, exist_ok=True)
    x, y = digit_images(n_train, rng)
    rows = np.concatenate([x.reshape(n_train, -1), y[:, None]], axis=1)
    with gzip.open(root / "mnist_5k" / "mnist_5k.csv.gz", "wt") as f:
        np.savetxt(f, rows, fmt="%d", delimiter=",")
    x, y = digit_images(n_test, rng)
    write_idx(root / "mnist_test" / "t10k-images-idx3-ubyte.gz", x)
    write_idx(root / "mnist_test" / "t10k-labels-idx1-ubyte.gz", y)
    with h5py.File(root / "usps" / "usps.h5", "w") as h:
        for split, n in zip(("train", "test"), n_usps, strict=True):
            x, y = digit_images(n, rng, side=16)
            h.create_dataset(f"{split}/data", data=x.reshape(n, 256).astype(np.float32) / 255.0)
            h.create_dataset(f"{split}/target", data=y.astype(np.int32))
    return root


def make_nyuv2(root: Path, n_train: int = 10, n_val: int = 4, hw: tuple[int, int] = (8, 12), seed: int = 0) -> Path:
    """The MTL-community NYUv2 layout ``root/{train,val}/{image,label,depth,normal}/<i>.npy``."""
    rng = np.random.default_rng(seed)
    h, w = hw
    for split, n in (("train", n_train), ("val", n_val)):
        for sub in ("image", "label", "depth", "normal"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            np.save(root / split / "image" / f"{i}.npy", rng.random((3, h, w)).astype(np.float32))
            label = rng.integers(-1, 13, (h, w)).astype(np.float32)
            np.save(root / split / "label" / f"{i}.npy", label)
            np.save(root / split / "depth" / f"{i}.npy", rng.random((1, h, w)).astype(np.float32))
            np.save(root / split / "normal" / f"{i}.npy", rng.standard_normal((3, h, w)).astype(np.float32))
    return root
