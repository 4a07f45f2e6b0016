"""Per-task losses by task kind: cross-entropy, pixel cross-entropy, masked L1 depth, cosine normals."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mola.tasks import TaskInfo


def _cross_entropy(task: TaskInfo, pred: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(pred.float(), target.long(), ignore_index=task.ignore_index)


def _masked_l1(task: TaskInfo, pred: Tensor, target: Tensor) -> Tensor:
    mask = (target != 0).to(pred.dtype)
    return ((pred - target).abs() * mask).sum() / mask.sum().clamp_min(1)


def _cosine(task: TaskInfo, pred: Tensor, target: Tensor) -> Tensor:
    mask = (target.abs().sum(dim=1, keepdim=True) > 0).to(pred.dtype)
    cos = (F.normalize(pred.float(), dim=1) * F.normalize(target.float(), dim=1)).sum(dim=1, keepdim=True)
    return ((1 - cos) * mask).sum() / mask.sum().clamp_min(1)


#: task kind -> (loss, number of elements it averages over); pixels/labels that are ignored do not count
LOSSES: dict[str, tuple[Callable[[TaskInfo, Tensor, Tensor], Tensor], Callable[[TaskInfo, Tensor], Tensor]]] = {
    "classification": (_cross_entropy, lambda task, target: (target != task.ignore_index).sum()),
    "segmentation": (_cross_entropy, lambda task, target: (target != task.ignore_index).sum()),
    "depth": (_masked_l1, lambda task, target: (target != 0).sum()),
    "normal": (_cosine, lambda task, target: (target.abs().sum(dim=1) > 0).sum()),
}


def task_loss(task: TaskInfo, pred: Tensor, target: Tensor) -> Tensor:
    """Mean loss of one task over its samples (valid pixels only for dense tasks), by its kind (``LOSSES``)."""
    return LOSSES[task.spec.name][0](task, pred, target)


def task_loss_count(task: TaskInfo, target: Tensor) -> Tensor:
    """How many elements ``task_loss`` averages over for ``target`` (labels or pixels that are not ignored)."""
    return LOSSES[task.spec.name][1](task, target)


def split_targets(tasks: list[TaskInfo], targets: object, rows: dict[int, Tensor] | None) -> dict[int, Tensor]:
    """Per-task targets aligned with the model's per-task outputs (rows per task, or dict targets)."""
    if isinstance(targets, dict):
        return {t: targets[task.name] for t, task in enumerate(tasks)}
    assert rows is not None and isinstance(targets, torch.Tensor)
    return {t: targets.index_select(0, r) for t, r in rows.items()}
