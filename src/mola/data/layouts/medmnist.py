"""``medmnist``: MedMNIST 2D ``.npz`` files, one task each (multi-input task heterogeneity).

Each ``<stem>.npz`` under ``cfg.root`` holds ``{train,val,test}_{images,labels}`` (images (N,28,28) gray or
(N,28,28,3) RGB uint8; labels (N,1) or (N,)). A sub-folder with ``<split>_images.npy`` and
``<split>_labels.npy`` files is a task too; when it lacks some splits' images (e.g. the shipped
``dermamnist_val_only/``: val images only), the available image splits are pooled and re-split (seeded,
stratified) into train/val/test.

Tasks: ``cfg.tasks`` (file stems or short names) or every npz / folder found, sorted. Short task names are the
stem up to ``mnist`` (``retinamnist`` -> ``retina``, ``pneumoniamnist_kaggle_variant`` -> ``pneumonia``).
num_classes comes from the official MedMNIST table when the stem starts with a known name, else max label + 1.
Pixels are scaled to [0, 1] and normalised with mean 0.5 / std 0.5 (MedMNIST's own convention); all tasks get
``cfg.channels`` channels (default: the max over tasks; gray replicated, RGB -> luminance for 1).
``cfg.image_size`` resizes lazily per item (data stays 28x28 in memory).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mola.data.config import DataConfig
from mola.data.layouts._common import (  # the readers live there: manytask uses them too
    SPLITS,
    cap_splits,
    class_labels,
    concat_task_ids,
    images_to_tensor,
    multi_input_scenario,
    name_seed,
    present_file,
    read_npy_folder,
    read_npz,
    require_dir,
    resolve_root,
    stratified_split,
    tree,
)
from mola.data.preprocess import ImagePreprocessing
from mola.data.registry import SCENARIOS
from mola.data.transforms import ResizeTensor, to_channels
from mola.tasks import ArrayTaskDataset, Scenario, TaskInfo

KNOWN_CLASSES = {
    "pathmnist": 9, "dermamnist": 7, "octmnist": 4, "pneumoniamnist": 2, "retinamnist": 5, "breastmnist": 2,
    "bloodmnist": 8, "tissuemnist": 8, "organamnist": 11, "organcmnist": 11, "organsmnist": 11,
}
MULTI_LABEL = ("chestmnist",)
LAYOUT = tree(
    "<root>/",
    "  <name>mnist.npz          keys train_images train_labels val_images val_labels test_images test_labels",
    "  <name>mnist_xyz/         a folder of <split>_images.npy + <split>_labels.npy (missing image splits",
    "                           are made by re-splitting the available ones)",
)


_ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
           "lung-right", "pancreas", "spleen")
KNOWN_LABELS: dict[str, tuple[str, ...]] = {
    "pathmnist": ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                  "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"),
    "dermamnist": ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                   "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                   "vascular lesions"),
    "octmnist": ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
    "pneumoniamnist": ("normal", "pneumonia"),
    "retinamnist": ("grade 0", "grade 1", "grade 2", "grade 3", "grade 4"),
    "breastmnist": ("malignant", "normal, benign"),
    "bloodmnist": ("basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte", "monocyte",
                   "neutrophil", "platelet"),
    "tissuemnist": ("collecting duct, connecting tubule", "distal convoluted tubule", "glomerular endothelial cells",
                    "interstitial endothelial cells", "leukocytes", "podocytes", "proximal tubule segments",
                    "thick ascending limb"),
    "organamnist": _ORGANS, "organcmnist": _ORGANS, "organsmnist": _ORGANS,
}
"""Class names of the official MedMNIST v2 label tables (medmnist/info.py), by file stem prefix."""


def known_labels(stem: str, num_classes: int) -> list[str] | None:
    """The official class names of a MedMNIST file stem, when it is a known subset with that many classes."""
    names = next((n for k, n in KNOWN_LABELS.items() if stem.lower().startswith(k)), None)
    return list(names) if names is not None and len(names) == num_classes else None


def short_name(stem: str) -> str:
    """``retinamnist`` -> ``retina``; stems without ``mnist`` are kept."""
    i = stem.lower().find("mnist")
    return stem[:i] if i > 0 else stem


def _labels(y: np.ndarray, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        raise ValueError(f"{where}: labels {y.shape} are multi-label; medmnist tasks must be multi-class")
    return class_labels(y.reshape(-1), where)


def discover(root: Path) -> dict[str, Path]:
    """stem -> path of every task (npz file or npy folder) in ``root``."""
    tasks = {p.stem: p for p in root.glob("*.npz") if present_file(p, "npz file")}
    for d in root.iterdir():
        if d.is_dir() and not d.name.startswith(".") and any(d.glob("*_images.npy")):
            tasks[d.name] = d
    return dict(sorted(tasks.items()))


def _resolve_tasks(requested: list[str] | None, found: dict[str, Path], root: Path) -> list[str]:
    if not found:
        raise FileNotFoundError(
            f"no MedMNIST .npz file or task folder in {str(root)!r}; expected layout:\n{LAYOUT}"
        )
    if requested is None:
        return list(found)
    stems = []
    for t in requested:
        if t in found:
            stems.append(t)
            continue
        match = [s for s in found if short_name(s) == t]
        if len(match) != 1:
            raise ValueError(
                f"unknown medmnist task {t!r} in {str(root)!r}; available: "
                + ", ".join(f"{s} ({short_name(s)})" for s in found)
            )
        stems.append(match[0])
    if len(set(stems)) != len(stems):
        raise ValueError(f"duplicate medmnist tasks in {requested}")
    return stems


def _read_split_files(path: Path) -> dict[str, tuple[Tensor, np.ndarray]]:
    """The (images, labels) of each split stored in one task's npz file / npy folder, checked."""
    raw = read_npy_folder(path, LAYOUT)[0] if path.is_dir() else read_npz(path)
    data = {}
    for s, (x, y) in raw.items():
        where = f"{str(path)!r} split {s!r}"
        xi, yi = images_to_tensor(x, where), _labels(y, where)
        if len(xi) != len(yi):
            raise ValueError(f"{where}: {len(xi)} images but {len(yi)} labels")
        data[s] = (xi, yi)
    sizes = {s: tuple(data[s][0].shape[-2:]) for s in data if len(data[s][0])}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{str(path)!r}: splits hold images of different sizes ("
                         + ", ".join(f"{s} {hw[0]}x{hw[1]}" for s, hw in sizes.items()) + "); use one resolution")
    return data


def _read_task(path: Path, stem: str, name: str, cfg: DataConfig
               ) -> tuple[dict[str, tuple[Tensor, np.ndarray]], TaskInfo, str]:
    """One task's train/val/test (re-split when the file lacks some splits, capped), its TaskInfo and a note
    saying what was re-split ("" if nothing)."""
    rng = name_seed(cfg.split_seed, stem)
    data = _read_split_files(path)
    have = list(data) if path.is_dir() else list(SPLITS)
    if stem in MULTI_LABEL:
        raise ValueError(f"{str(path)!r}: {stem} is multi-label; not supported as a multi-class task")
    note = ""
    if len(have) < len(SPLITS):
        xs = torch.cat([data[s][0] for s in have])
        ys = np.concatenate([data[s][1] for s in have])
        tr, va, te = stratified_split(ys, cfg.val_fraction, cfg.test_fraction, rng)
        data = {"train": (xs[tr], ys[tr]), "val": (xs[va], ys[va]), "test": (xs[te], ys[te])}
        note = (f"{name}: only {'/'.join(have)} images exist in {path.name}/; their {len(ys)} images were "
                f"re-split (seeded, stratified) into train/val/test {len(tr)}/{len(va)}/{len(te)}")
    idx = cap_splits({s: np.arange(len(data[s][1])) for s in SPLITS}, cfg, rng)
    data = {s: (data[s][0][idx[s]], data[s][1][idx[s]]) for s in SPLITS}
    ymax = max((int(data[s][1].max()) for s in SPLITS if len(data[s][1])), default=0)
    known = next((n for k, n in KNOWN_CLASSES.items() if stem.lower().startswith(k)), None)
    ncls = known if known is not None else ymax + 1
    if ymax >= ncls or min((int(data[s][1].min()) for s in SPLITS if len(data[s][1])), default=0) < 0:
        raise ValueError(f"{str(path)!r}: labels outside 0..{ncls - 1}")
    return data, TaskInfo(name, "classification", ncls), note


@SCENARIOS.register("medmnist")
def build_medmnist(cfg: DataConfig) -> Scenario:
    """MedMNIST npz files / npy folders -> a multi-input Scenario, one task (and head) per file."""
    root = resolve_root(cfg.root)
    require_dir(root, LAYOUT)
    found = discover(root)
    stems = _resolve_tasks(cfg.tasks, found, root)
    names = [short_name(s) for s in stems]
    if len(set(names)) != len(names):
        names = stems

    per_task: dict[str, dict[str, tuple[Tensor, np.ndarray]]] = {}
    infos: list[TaskInfo] = []
    notes: list[str] = []
    for stem, name in zip(stems, names, strict=True):
        per_task[stem], info, note = _read_task(found[stem], stem, name, cfg)
        infos.append(info)
        notes += [note] if note else []

    channels = cfg.channels or max(per_task[s]["train"][0].shape[1] for s in stems)
    hw = tuple(per_task[stems[0]]["train"][0].shape[-2:])
    for s in stems:
        for split in SPLITS:
            other = tuple(per_task[s][split][0].shape[-2:])
            if len(per_task[s][split][0]) and other != hw:
                raise ValueError(f"medmnist images of different sizes: {stems[0]} train {hw}, {s} {split} {other} "
                                 f"({str(found[s])!r}; use files of one resolution)")
    size = cfg.image_size or hw[0]
    tf = ResizeTensor(size) if (size, size) != hw else None
    ds = {}
    for split in SPLITS:
        xs = torch.cat([to_channels(per_task[s][split][0], channels) for s in stems])
        ys = torch.from_numpy(np.concatenate([per_task[s][split][1] for s in stems]))
        ds[split] = ArrayTaskDataset(xs, ys, concat_task_ids([len(per_task[s][split][1]) for s in stems]), tf)
    return multi_input_scenario(
        "medmnist", infos, ds, (channels, size, size),
        notes="; ".join(
            [f"MedMNIST tasks from {str(root)!r}: {', '.join(stems)}; pixels /255 then (x-0.5)/0.5; "
             f"{channels} channel(s) (gray replicated, RGB to luminance as needed); {hw[0]}x{hw[1]} images"
             + (f", resized to {size}x{size}" if tf is not None else ", not resized")] + notes
        ),
        extra={"files": {n: str(found[s]) for n, s in zip(names, stems, strict=True)}, "root": str(root),
               "classes": {i.name: known_labels(s, i.num_classes or 0) or [str(c) for c in range(i.num_classes or 0)]
                           for i, s in zip(infos, stems, strict=True)}},
        preprocessing=ImagePreprocessing.normalized((channels, size, size), 0.5, 0.5),
    )
