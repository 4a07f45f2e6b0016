"""``folder``: DomainBed image folders ``root/<domain>/<class>/<image>`` (VLCS, PACS, Office-Home, ...).

Domain heterogeneity: every domain shares one label space (the sorted union of class folder names) and one
head. Images are read lazily with PIL (RGB), resized to ``cfg.image_size`` (default 224), converted with
ToTensor and normalised with ImageNet statistics; ``cfg.augment`` adds DomainBed's train augmentation.
Each domain is split on its own into train/val/test (seeded, stratified by class).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from mola.data.config import DataConfig
from mola.data.layouts._common import (
    ImageFileDataset,
    cap_splits,
    image_files,
    name_seed,
    require_dir,
    resolve_root,
    select_names,
    stratified_split,
    subdirs,
    tree,
    verify_image_files,
)
from mola.data.preprocess import ImagePreprocessing
from mola.data.registry import SCENARIOS
from mola.data.transforms import ImageFileTransform, normalize_stats
from mola.tasks import Scenario, TaskInfo

FOLDER_LAYOUT = tree(
    "<root>/",
    "  <domain>/          e.g. art_painting/",
    "    <class>/         e.g. dog/",
    "      <image>        .jpg / .png / ...",
)

SPLITS = ("train", "val", "test")


def scan_group(group: Path, layout: str, what: str) -> dict[str, list[Path]]:
    """Map class name -> sorted image paths for ``group/<class>/<image>``; a wrong layout is a ValueError."""
    classes = subdirs(group)
    stray = image_files(group)
    if not classes:
        hint = f" (it holds {len(stray)} image files directly: the <class> level is missing)" if stray else ""
        raise ValueError(
            f"{what} folder {str(group)!r} has no class sub-folders{hint}; expected layout:\n{layout}"
        )
    if {c.name for c in classes} <= set(SPLITS):
        raise ValueError(f"{what} folder {str(group)!r} holds split folders ({', '.join(c.name for c in classes)}), "
                         "not class folders: for root/<task>/<split>/<class>/<image> use data.kind=tasks")
    found = {c.name: image_files(c) for c in classes}
    if not any(found.values()):
        raise ValueError(
            f"{what} folder {str(group)!r} has class folders ({', '.join(found)}) but no image files "
            f"(extensions .jpg/.png/...); expected layout:\n{layout}"
        )
    return {c: files for c, files in found.items() if files}


def list_groups(root: Path, requested: list[str] | None, layout: str, what: str) -> list[str]:
    """Names of the ``root/<group>`` folders to use: ``requested`` (validated) or all, sorted."""
    require_dir(root, layout)
    available = [d.name for d in subdirs(root)]
    if not available:
        raise ValueError(f"{str(root)!r} has no {what} sub-folders; expected layout:\n{layout}")
    return select_names(requested, available, what, root)


def split_group(
    files: dict[str, list[Path]], class_index: dict[str, int], cfg: DataConfig, name: str
) -> dict[str, tuple[list[Path], list[int]]]:
    """Seeded stratified split (and caps) of one group's files -> split -> (paths, labels)."""
    paths = [p for c in sorted(files) for p in files[c]]
    labels = np.array([class_index[c] for c in sorted(files) for _ in files[c]], dtype=np.int64)
    rng = name_seed(cfg.split_seed, name)
    try:
        tr, va, te = stratified_split(labels, cfg.val_fraction, cfg.test_fraction, rng)
    except ValueError as e:
        raise ValueError(f"{name!r}: {e}") from e
    idx = cap_splits({"train": tr, "val": va, "test": te}, cfg, rng)
    return {s: ([paths[i] for i in idx[s]], labels[idx[s]].tolist()) for s in SPLITS}


def build_file_splits(
    groups: list[str],
    per_group: dict[str, dict[str, tuple[list[Path], list[int]]]],
    cfg: DataConfig,
    size: int,
    channels: int,
    gray: bool = False,
) -> dict[str, ImageFileDataset]:
    """Concatenate the groups' splits (task id = group position) into lazy ImageFileDatasets."""
    out = {}
    for s in SPLITS:
        paths: list[Path] = []
        labels: list[int] = []
        tids: list[int] = []
        for t, g in enumerate(groups):
            p, lab = per_group[g][s]
            paths += p
            labels += lab
            tids += [t] * len(p)
        verify_image_files(paths)  # header + verify now: a corrupt file fails here, not in epoch 3
        recipe = "paper" if cfg.augment == "paper" else "domainbed"
        tf = ImageFileTransform(size, channels, augment=bool(cfg.augment) and s == "train", gray=gray, recipe=recipe)
        out[s] = ImageFileDataset(paths, labels, tids, tf)
    return out


def check_looks_like_tasks(root: Path, files: dict[str, dict[str, list[Path]]]) -> None:
    """Refuse, before any training, a folder shaped like the per-task layout (``data.kind: tasks``): two
    domains without a class in common (tasks with their own label spaces, which one shared head over the union
    would mix up). Split folders in place of class folders are refused by ``scan_group``."""
    names = list(files)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if not set(files[a]) & set(files[b]):
                raise ValueError(
                    f"domains {a!r} and {b!r} of {str(root)!r} share no class ({', '.join(sorted(files[a]))} vs "
                    f"{', '.join(sorted(files[b]))}): this looks like tasks with their own label spaces; use "
                    "data.kind=tasks (one head per task). data.kind=folder is for domains of one label space "
                    "(one shared head)")


@SCENARIOS.register("folder")
def build_folder(cfg: DataConfig) -> Scenario:
    """DomainBed folder layout ``root/<domain>/<class>/<image>`` -> a domain-heterogeneity Scenario."""
    root = resolve_root(cfg.root)
    domains = list_groups(root, cfg.domains, FOLDER_LAYOUT, "domain")
    files = {d: scan_group(root / d, FOLDER_LAYOUT, "domain") for d in domains}
    check_looks_like_tasks(root, files)
    classes = sorted(set().union(*(f.keys() for f in files.values())))
    class_index = {c: i for i, c in enumerate(classes)}
    missing = {d: sorted(set(classes) - set(files[d])) for d in domains if set(files[d]) != set(classes)}
    if missing:  # the label space is the union of class folders (documented); say which domains lack which
        detail = "; ".join(f"{d} lacks {', '.join(m)}" for d, m in missing.items())
        warnings.warn(f"the domains of {str(root)!r} have different class folders ({detail}); the shared head "
                      f"uses the union of all {len(classes)} classes, so these domains never show some of them",
                      RuntimeWarning, stacklevel=2)
    per_domain = {d: split_group(files[d], class_index, cfg, d) for d in domains}
    size = cfg.image_size or 224
    channels = cfg.channels or 3
    ds = build_file_splits(domains, per_domain, cfg, size, channels)
    notes = (
        f"DomainBed folder layout at {str(root)!r}: {len(domains)} domains, {len(classes)} classes (sorted "
        f"union of class folders), per-domain seeded stratified split val={cfg.val_fraction} "
        f"test={cfg.test_fraction} seed={cfg.split_seed}; images resized to {size}x{size}, ImageNet-normalised."
    )
    if missing:
        notes += f" Classes absent from some domains: {missing}."
    return Scenario(
        name=root.resolve().name,
        heterogeneity="domain",
        tasks=[TaskInfo(d, "classification", len(classes)) for d in domains],
        train=ds["train"],
        val=ds["val"],
        test=ds["test"],
        input_shape=(channels, size, size),
        shared_head=True,
        notes=notes,
        extra={"classes": classes, "root": str(root)},
        preprocessing=ImagePreprocessing.normalized((channels, size, size), *normalize_stats(channels),
                                                    resize="crop" if cfg.augment == "paper" else "pil"),
    )
