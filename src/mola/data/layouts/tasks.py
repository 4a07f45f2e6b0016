"""``tasks``: one image folder per task, ``root/<task>/[<split>/]<class>/<image>`` (your own multi-task images).

Multi-input task heterogeneity: each task has its own images and its own label space (its sorted class folders,
over all its split folders), hence its own head. A task folder either holds its class folders directly (the
task is split on its own: seeded, stratified, ``data.val_fraction`` / ``data.test_fraction``) or split folders
``train/`` (required), ``val/`` and ``test/`` holding class folders; a split folder that is absent is carved out
of ``train/`` by its fraction.

Channels: ``data.channels``, or (null) 3 when any image of the selected tasks is in colour, else 1. Gray images
in a colour set are replicated to 3 channels; in a 1-channel set colour images become luminance. Size:
``data.image_size``, or (null) the largest image side found, at most 224; every image is resized to a square of
that side. ImageNet statistics for 3 channels, 0.5/0.5 for 1. ``radimagenet`` is this layout with every image
read as grayscale.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mola.data.base import Scenario, TaskInfo
from mola.data.config import DataConfig
from mola.data.layouts._common import (
    ImageFileDataset,
    cap,
    name_seed,
    read_image_headers,
    resolve_root,
    stratified_split,
    subdirs,
    tree,
)
from mola.data.layouts.folder import SPLITS, list_groups, scan_group
from mola.data.preprocess import ImagePreprocessing
from mola.data.registry import SCENARIOS
from mola.data.transforms import ImageFileTransform, normalize_stats

TASKS_LAYOUT = tree(
    "<root>/",
    "  <task>/              e.g. colors/",
    "    [train|val|test/]  optional split folders (else: seeded fractions of each task)",
    "      <class>/         e.g. red/",
    "        <image>        .png / .jpg / ...",
)

MAX_DEFAULT_SIZE = 224
"""``data.image_size: null`` resizes to the largest image side found, at most this."""

COLOR_MODES = ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "PA")


@dataclass
class TaskFiles:
    """One task's files: split -> (paths, labels), its classes, and whether its splits came from folders."""

    classes: list[str]
    splits: dict[str, tuple[list[Path], list[int]]]
    from_folders: list[str] = field(default_factory=list)


def _split_folders(task_dir: Path, layout: str) -> list[str] | None:
    """The split folders of a task (``train`` and any of ``val``/``test``), or None when it holds classes."""
    names = [d.name for d in subdirs(task_dir)]
    if "train" in names and set(names) <= set(SPLITS):
        return [s for s in SPLITS if s in names]
    if set(names) & set(SPLITS) and set(names) <= set(SPLITS):
        raise ValueError(f"task folder {str(task_dir)!r} has split folders {sorted(names)} but no 'train/'; "
                         f"expected layout:\n{layout}")
    return None


def _flatten(files: dict[str, list[Path]], index: dict[str, int]) -> tuple[list[Path], np.ndarray]:
    paths = [p for c in sorted(files) for p in files[c]]
    labels = np.array([index[c] for c in sorted(files) for _ in files[c]], dtype=np.int64)
    return paths, labels


def scan_task(task_dir: Path, cfg: DataConfig, name: str, layout: str = TASKS_LAYOUT) -> TaskFiles:
    """Read one task folder (with or without split folders) and split it (seeded, stratified, capped)."""
    rng = name_seed(cfg.split_seed, name)
    folders = _split_folders(task_dir, layout)
    if folders is None:
        found = {"train": scan_group(task_dir, layout, "task")}
    else:
        found = {s: scan_group(task_dir / s, layout, f"task {name!r} split") for s in folders}
    classes = sorted(set().union(*(f.keys() for f in found.values())))
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = _flatten(found["train"], index)
    val_f = cfg.val_fraction if "val" not in found else 0.0
    test_f = cfg.test_fraction if "test" not in found else 0.0
    try:
        tr, va, te = stratified_split(labels, val_f, test_f, rng)
    except ValueError as e:
        raise ValueError(f"task {name!r}: {e}") from e
    parts: dict[str, tuple[list[Path], np.ndarray]] = {
        "train": ([paths[i] for i in tr], labels[tr]), "val": ([paths[i] for i in va], labels[va]),
        "test": ([paths[i] for i in te], labels[te])}
    for s in ("val", "test"):
        if s in found:
            parts[s] = _flatten(found[s], index)
    limits = {"train": cfg.max_per_task, "val": cfg.max_eval_per_task, "test": cfg.max_eval_per_task}
    splits = {}
    for s, (p, lab) in parts.items():
        idx = cap(np.arange(len(p)), limits[s], rng)
        splits[s] = ([p[i] for i in idx], lab[idx].tolist())
    return TaskFiles(classes, splits, [s for s in (folders or []) if s != "train"])


def check_looks_like_domains(root: Path, files: dict[str, TaskFiles]) -> str:
    """A note (and a RuntimeWarning) when every task has the very same class folders: that is the shape of
    domains of one label space (``data.kind: folder``, one shared head); "" otherwise."""
    sets = {tuple(f.classes) for f in files.values()}
    if len(files) < 2 or len(sets) != 1:
        return ""
    msg = (f"the {len(files)} tasks of {str(root)!r} all have the same classes ({', '.join(next(iter(sets)))}): "
           "data.kind tasks gives each task its own head; if they are domains of one label space, "
           "data.kind folder trains one shared head")
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return msg


def channel_rule(modes: dict[str, int], requested: int | None, gray: bool) -> tuple[int, str]:
    """Input channels and the sentence saying why: ``requested``, else 3 if any image is in colour, else 1."""
    colour = sum(n for m, n in modes.items() if m in COLOR_MODES)
    found = ", ".join(f"{n} {m}" for m, n in sorted(modes.items()))
    if gray:
        c = requested or 3
        return c, f"images read as grayscale ({found}) -> {c} channel(s)"
    if requested:
        return requested, f"{requested} channel(s) (data.channels; found {found})"
    c = 3 if colour else 1
    why = "some images are in colour; gray ones replicated" if colour else "every image is gray"
    return c, f"{c} channel(s): {why} ({found})"


def size_rule(sizes: list[tuple[int, int]], requested: int | None, default: int | None) -> tuple[int, str]:
    """Square side every image is resized to, and a sentence on what gets resized."""
    side = requested or default or min(MAX_DEFAULT_SIZE, max(max(s) for s in sizes))
    distinct = sorted(set(sizes))
    shown = ", ".join(f"{w}x{h}" for w, h in distinct[:4]) + (", ..." if len(distinct) > 4 else "")
    resized = sum(s != (side, side) for s in sizes)
    return side, f"image sizes {shown}; {resized} of {len(sizes)} resized to {side}x{side}"


def build_task_folders(cfg: DataConfig, *, gray: bool = False, default_size: int | None = None,
                       name: str | None = None, layout: str = TASKS_LAYOUT) -> Scenario:
    """``root/<task>/[<split>/]<class>/<image>`` -> a multi-input Scenario (one head per task)."""
    root = resolve_root(cfg.root)
    tasks = list_groups(root, cfg.tasks, layout, "task")
    files = {t: scan_task(root / t, cfg, t, layout) for t in tasks}
    looks = check_looks_like_domains(root, files)
    all_paths = {s: [p for t in tasks for p in files[t].splits[s][0]] for s in SPLITS}
    headers = read_image_headers([p for s in SPLITS for p in all_paths[s]])
    modes: dict[str, int] = {}
    for m, _ in headers:
        modes[m] = modes.get(m, 0) + 1
    channels, channel_note = channel_rule(modes, cfg.channels, gray)
    size, size_note = size_rule([s for _, s in headers], cfg.image_size, default_size)
    recipe = "paper" if cfg.augment == "paper" else "domainbed"
    ds = {}
    for s in SPLITS:
        labels = [lab for t in tasks for lab in files[t].splits[s][1]]
        tids = [i for i, t in enumerate(tasks) for _ in files[t].splits[s][0]]
        tf = ImageFileTransform(size, channels, augment=bool(cfg.augment) and s == "train", gray=gray, recipe=recipe)
        ds[s] = ImageFileDataset(all_paths[s], labels, tids, tf)
    split_note = "; ".join(
        f"{t}: {'val/test from folders' if len(files[t].from_folders) == 2 else 'seeded stratified split'}"
        + (f" ({'+'.join(files[t].from_folders)} from folders)" if len(files[t].from_folders) == 1 else "")
        for t in tasks)
    notes = (f"per-task image folders at {str(root)!r}: {len(tasks)} tasks, each with its own classes and head "
             f"({split_note}; val={cfg.val_fraction} test={cfg.test_fraction} seed={cfg.split_seed}); "
             f"{channel_note}; {size_note}." + (f" Note: {looks}." if looks else ""))
    counts = {t: {s: np.bincount(np.asarray(files[t].splits[s][1], dtype=np.int64),
                                 minlength=len(files[t].classes)).tolist() for s in SPLITS} for t in tasks}
    extra: dict[str, Any] = {"classes": {t: files[t].classes for t in tasks}, "root": str(root),
                             "class_counts": counts, "channels_note": channel_note, "size_note": size_note}
    if looks:
        extra["layout_note"] = looks
    return Scenario(
        name=name or root.resolve().name,
        heterogeneity="multi_input",
        tasks=[TaskInfo(t, "classification", len(files[t].classes)) for t in tasks],
        train=ds["train"], val=ds["val"], test=ds["test"],
        input_shape=(channels, size, size),
        shared_head=False,
        notes=notes,
        extra=extra,
        preprocessing=ImagePreprocessing.normalized((channels, size, size), *normalize_stats(channels),
                                                    resize="crop" if cfg.augment == "paper" else "pil", gray=gray),
    )


@SCENARIOS.register("tasks")
def build_tasks(cfg: DataConfig) -> Scenario:
    """Per-task image folders ``root/<task>/[<split>/]<class>/<image>`` -> a multi-input Scenario."""
    return build_task_folders(cfg)


__all__ = ["TASKS_LAYOUT", "build_task_folders", "build_tasks", "channel_rule", "scan_task", "size_rule"]
