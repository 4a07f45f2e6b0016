"""``nyuv2``: the MTL-community NYUv2 layout (single-input task heterogeneity: one image, three dense tasks).

``root/{train,val}/{image,label,depth,normal}/<i>.npy``: image (3,H,W) float, label (H,W) with -1 = ignore and
13 classes, depth (1,H,W), normal (3,H,W). Files are read lazily per item and passed on unchanged (the
preprocessed images are already scaled floats). The source ``val`` split is mola's test split; mola's val
split is carved from the source train split (seeded, ``cfg.val_fraction``). ``cfg.tasks`` may select a subset of
``segmentation``, ``depth``, ``normal``. Items: ``(image, {task: target}, ALL_TASKS)``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mola.data.config import DataConfig
from mola.data.layouts._common import cap, name_seed, require_dir, resolve_root, stratified_split, tree
from mola.data.registry import SCENARIOS
from mola.tasks import ALL_TASKS, Scenario, TaskDataset, TaskInfo

NUM_SEG_CLASSES = 13
TASKS = {
    "segmentation": TaskInfo("segmentation", "segmentation", NUM_SEG_CLASSES, ignore_index=-1),
    "depth": TaskInfo("depth", "depth"),
    "normal": TaskInfo("normal", "normal"),
}
FOLDER_OF = {"segmentation": "label", "depth": "depth", "normal": "normal"}
LAYOUT = tree(
    "<root>/",
    "  train/",
    "    image/   0.npy 1.npy ...   (3,H,W) float",
    "    label/   0.npy ...         (H,W) segmentation, -1 = ignore, 13 classes",
    "    depth/   0.npy ...         (1,H,W)",
    "    normal/  0.npy ...         (3,H,W)",
    "  val/       same sub-folders (becomes mola's test split)",
)


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"cannot read npy file {path!r}: {e}") from e


class NYUv2Dataset(TaskDataset):
    """Lazy NYUv2 split: sample i reads ``<split>/{image,label,depth,normal}/<name_i>.npy``."""

    def __init__(self, folder: Path, names: list[str], tasks: list[str],
                 size: tuple[int, int] | None = None) -> None:
        self.folder, self.names, self.tasks = folder, list(names), list(tasks)
        self.size = size  # (H, W) every image must have (batches stack them); None: not checked
        self.task_ids = np.full(len(self.names), ALL_TASKS, dtype=np.int64)

    def _path(self, sub: str, i: int) -> str:
        return str(self.folder / sub / f"{self.names[i]}.npy")

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor], int]:
        x = torch.from_numpy(np.ascontiguousarray(_load_npy(self._path("image", i)), dtype=np.float32))
        if x.dim() != 3 or x.shape[0] != 3:
            p = self._path("image", i)
            raise ValueError(f"NYUv2 image {p!r} has shape {tuple(x.shape)}, expected (3,H,W)")
        hw = tuple(x.shape[-2:])
        if self.size is not None and hw != tuple(self.size):
            raise ValueError(f"NYUv2 image {self._path('image', i)!r} (index {i}) is {hw[0]}x{hw[1]}, but the "
                             f"images of this scenario are {self.size[0]}x{self.size[1]} (use one resolution)")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"NYUv2 image {self._path('image', i)!r} (index {i}) holds NaN or inf pixels")
        out: dict[str, Tensor] = {}
        for t in self.tasks:
            p = self._path(FOLDER_OF[t], i)
            a = _load_npy(p)
            if t == "segmentation":
                a = np.asarray(a, dtype=np.float64)
                bad = ~np.isfinite(a) | (a != np.rint(a)) | (a < -1) | (a >= NUM_SEG_CLASSES)
                if bad.any():
                    v = a.reshape(-1)[int(np.flatnonzero(bad.reshape(-1))[0])]
                    raise ValueError(f"NYUv2 segmentation label file {p!r} (index {i}) holds {v}; labels must be "
                                     f"integers in 0..{NUM_SEG_CLASSES - 1} or -1 (ignore)")
                y = torch.from_numpy(a.astype(np.int64))
                y = y.reshape(y.shape[-2:]) if y.dim() == 3 and y.shape[0] == 1 else y
                want = hw
            else:
                y = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
                if not bool(torch.isfinite(y).all()):
                    raise ValueError(f"NYUv2 {t} target {p!r} (index {i}) holds NaN or inf values")
                y = y.unsqueeze(0) if (t == "depth" and y.dim() == 2) else y
                want = (1 if t == "depth" else 3, *hw)
            if tuple(y.shape) != want:
                raise ValueError(f"NYUv2 {t} target {p!r} has shape {tuple(y.shape)}, expected {want}")
            out[t] = y
        return x, out, ALL_TASKS


def _numeric_key(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def scan_split(folder: Path, tasks: list[str]) -> list[str]:
    """Sample names (file stems, numeric order) present in every needed sub-folder of one source split."""
    require_dir(folder, LAYOUT)
    subs = ["image"] + [FOLDER_OF[t] for t in tasks]
    listing = {}
    for s in subs:
        require_dir(folder / s, LAYOUT)
        listing[s] = {p.stem for p in (folder / s).glob("*.npy")}
    ref = listing["image"]
    if not ref:
        raise ValueError(
            f"NYUv2 folder {str(folder / 'image')!r} holds no .npy files; expected layout:\n{LAYOUT}"
        )
    for s in subs[1:]:
        if listing[s] != ref:
            only_img = sorted(ref - listing[s], key=_numeric_key)[:5]
            only_s = sorted(listing[s] - ref, key=_numeric_key)[:5]
            raise ValueError(
                f"NYUv2 file lists differ between {str(folder / 'image')!r} ({len(ref)} files) and "
                f"{str(folder / s)!r} ({len(listing[s])} files): only in image: {only_img}, "
                f"only in {s}: {only_s}"
            )
    return sorted(ref, key=_numeric_key)


@SCENARIOS.register("nyuv2")
def build_nyuv2(cfg: DataConfig) -> Scenario:
    """NYUv2 ``root/{train,val}/{image,label,depth,normal}`` -> a single-input Scenario of 3 dense tasks."""
    root = resolve_root(cfg.root)
    require_dir(root, LAYOUT)
    if cfg.tasks is None:
        tasks = list(TASKS)
    else:
        bad = [t for t in cfg.tasks if t not in TASKS]
        if bad or not cfg.tasks:
            raise ValueError(f"unknown NYUv2 task(s) {bad}; accepted: {', '.join(TASKS)}")
        tasks = [t for t in TASKS if t in cfg.tasks]
    train_names = scan_split(root / "train", tasks)
    test_names = scan_split(root / "val", tasks)
    rng = name_seed(cfg.split_seed, "nyuv2")
    tr, va, _ = stratified_split(None, cfg.val_fraction, 0.0, rng, n=len(train_names))
    tr, va = cap(tr, cfg.max_per_task, rng), cap(va, cfg.max_eval_per_task, rng)
    te = cap(np.arange(len(test_names)), cfg.max_eval_per_task, rng)
    train = NYUv2Dataset(root / "train", [train_names[i] for i in tr], tasks)
    val = NYUv2Dataset(root / "train", [train_names[i] for i in va], tasks)
    test = NYUv2Dataset(root / "val", [test_names[i] for i in te], tasks)
    x0, _, _ = train[0]
    for ds in (train, val, test):
        ds.size = (int(x0.shape[-2]), int(x0.shape[-1]))
    return Scenario(
        name="nyuv2",
        heterogeneity="single_input",
        tasks=[replace(TASKS[t]) for t in tasks],
        train=train,
        val=val,
        test=test,
        input_shape=tuple(x0.shape),
        shared_head=False,
        notes=(
            f"NYUv2 (MTL-community .npy layout) from {str(root)!r}: source val -> test; "
            f"val = {cfg.val_fraction} of source train (seeded, seed {cfg.split_seed}); "
            "segmentation 13 classes, -1 ignored."
        ),
        extra={"root": str(root)},
    )
