"""Checks every Scenario passes before training: non-empty splits, task ids and labels in range.

Run on the index arrays only (task ids, labels, in-memory targets): no image is read. Each error names the
scenario, the split, the offending sample index and value, and the task it belongs to.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mola.tasks import ALL_TASKS, Scenario, TaskDataset, TaskInfo

CHECKED_SPLITS = ("train", "val", "test")


def _as_array(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _where(scenario: Scenario, split: str) -> str:
    root = scenario.extra.get("root") if isinstance(scenario.extra, dict) else None
    return f"{split} split of scenario {scenario.name!r}" + (f" ({root})" if root else "")


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))[0])


def _check_task_ids(scenario: Scenario, split: str, ds: TaskDataset) -> np.ndarray:
    where = _where(scenario, split)
    ids = _as_array(getattr(ds, "task_ids", None))
    if ids.ndim != 1 or len(ids) != len(ds):
        raise ValueError(f"{where}: task_ids must be a 1-d array with one id per sample ({len(ds)}), "
                         f"got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{where}: task ids must be integers, got dtype {ids.dtype}")
    t = scenario.num_tasks
    if scenario.heterogeneity == "single_input":
        bad = ids != ALL_TASKS
        if bad.any():
            i = _first_bad(bad)
            raise ValueError(f"{where}: single-input samples carry task id {ALL_TASKS} (every task), but sample {i} "
                             f"has task id {int(ids[i])}")
        return ids
    bad = (ids < 0) | (ids >= t)
    if bad.any():
        i = _first_bad(bad)
        names = ", ".join(x.name for x in scenario.tasks)
        raise ValueError(f"{where}: task id {int(ids[i])} at index {i} is out of range [0, {t}) "
                         f"for the {t} task(s) {names}")
    return ids


def _check_labels(where: str, task: TaskInfo, labels: np.ndarray, index: np.ndarray) -> None:
    """``labels[j]`` belongs to sample ``index[j]`` of task ``task``; they must be valid class indices."""
    if not task.spec.classes or not len(labels):
        return
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels of task {task.name!r} must be integers, got dtype {labels.dtype}")
    n = task.num_classes or 0
    bad = ((labels < 0) | (labels >= n)) & (labels != task.ignore_index)
    if bad.any():
        j = _first_bad(bad)
        value = labels[j].reshape(-1)[np.flatnonzero(bad[j].reshape(-1))[0]]
        raise ValueError(f"{where}: label {int(value)} at index {int(index[j])} is out of range for task "
                         f"{task.name!r} ({n} classes: labels 0..{n - 1})")


def require_nonempty(scenario: Scenario, *splits: str) -> None:
    """ValueError naming the scenario and split if one of ``splits`` has no sample (training needs train and
    val: val selects the best checkpoint)."""
    for split in splits:
        if len(getattr(scenario, split)) == 0:
            raise ValueError(f"{_where(scenario, split)} is empty; check data.root, data.tasks / data.domains, "
                             "data.max_per_task, data.max_eval_per_task and the split fractions")


def tasks_without_rows(scenario: Scenario, split: str) -> list[str]:
    """Names of the tasks (domains) with no row in ``split`` (none for single-input scenarios, whose every row
    serves every task)."""
    ds = getattr(scenario, split)
    if scenario.heterogeneity == "single_input" or len(ds) == 0:
        return [] if len(ds) else [t.name for t in scenario.tasks]
    counts = np.bincount(_as_array(ds.task_ids), minlength=scenario.num_tasks)
    return [scenario.tasks[k].name for k in np.flatnonzero(counts == 0)]


def missing_eval_rows(scenario: Scenario, test: bool, allow: bool) -> dict[str, list[str]]:
    """``{"val": [...], "test": [...]}``: the tasks that would be trained on but left out of selection,
    final.json and the means for lack of val rows (or of test rows while the test split has some, if ``test``).
    A ValueError naming them, their train rows and the fix unless ``allow``; with ``allow``, the dict."""
    missing = {"val": tasks_without_rows(scenario, "val"),
               "test": tasks_without_rows(scenario, "test") if test and len(scenario.test) else []}
    missing = {s: names for s, names in missing.items() if names}
    if missing and not allow:
        what = "; ".join(f"no {s} rows: {', '.join(map(repr, names))}" for s, names in missing.items())
        raise ValueError(f"{_where(scenario, 'val/test')}: some tasks/domains would be trained on but never "
                         f"evaluated ({what}). Give them more samples (the folder layout "
                         "needs >= 3 images per class for a val row), raise data.val_fraction / data.test_fraction "
                         "or data.max_eval_per_task, or set train.allow_missing_eval=true to train anyway (final.json "
                         "and mola report then mark them)")
    return missing


def validate_scenario(scenario: Scenario) -> Scenario:
    """Check ``scenario`` and return it; ValueError naming the split, task, index and value on a problem.

    - the train split must be non-empty, and every task must have training samples (an empty val or test
      split is allowed here; ``Trainer`` requires val with ``require_nonempty``);
    - task ids: integers in [0, T) (single-input: all ``ALL_TASKS``);
    - classification/segmentation labels (where the dataset holds them in memory) in [0, num_classes) or the
      task's ``ignore_index``."""
    if not scenario.tasks:
        raise ValueError(f"scenario {scenario.name!r} has no tasks")
    require_nonempty(scenario, "train")
    for split in CHECKED_SPLITS:
        ds = getattr(scenario, split)
        where = _where(scenario, split)
        if len(ds) == 0:
            continue
        ids = _check_task_ids(scenario, split, ds)
        if split == "train" and scenario.heterogeneity != "single_input":
            counts = np.bincount(ids, minlength=scenario.num_tasks)
            empty = [scenario.tasks[k].name for k in np.flatnonzero(counts == 0)]
            if empty:
                raise ValueError(f"{where}: task(s) {', '.join(map(repr, empty))} have no training samples")
        labels = getattr(ds, "labels", None)
        if labels is not None and scenario.heterogeneity != "single_input":
            labels = _as_array(labels)
            for k, task in enumerate(scenario.tasks):
                info = scenario.tasks[0] if scenario.shared_head else task
                rows = np.flatnonzero(ids == k)
                if len(rows):
                    _check_labels(where, TaskInfo(task.name, info.kind, info.num_classes, info.ignore_index),
                                  labels[rows], rows)
        targets = getattr(ds, "targets", None)
        if isinstance(targets, dict):
            rows = np.arange(len(ds))
            for task in scenario.tasks:
                if task.name in targets:
                    _check_labels(where, task, _as_array(targets[task.name]), rows)
    return scenario
