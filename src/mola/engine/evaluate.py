"""Per-task losses of a batch and evaluation of a model on a loader (the Trainer, ``mola eval``)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from mola.engine.losses import split_targets, task_loss
from mola.layers.routing import task_groups
from mola.metrics import make_meter, mean_over_tasks
from mola.models.base import MultiTaskModel
from mola.tasks import TaskInfo


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors (also inside dicts) moved to ``device`` without blocking the host."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def host_batch(model: MultiTaskModel, batch: Any, device: torch.device) -> tuple[Any, Any, Tensor]:
    """``(x, y, t)`` moved to ``device``, with the batch's task groups (order and per-task counts) computed first,
    while the task ids are still host (CPU) tensors, and handed to the model: its forward, its MoLA layers and
    the per-task losses then need no device sync to size their per-task slices (docs/performance.md)."""
    x, y, t = batch
    groups = None
    if not model.single_input and isinstance(t, Tensor) and t.device.type == "cpu":
        model.check_inputs(x, t)  # the model's own error for bad ids, before bincount sees them
        groups = task_groups(t, model.num_tasks)
    x, y, t = to_device(x, device), to_device(y, device), to_device(t, device)
    if groups is not None:
        model.use_task_groups(t, (to_device(groups[0], device), groups[1]))
    return x, y, t


def forward_losses(model: MultiTaskModel, tasks: list[TaskInfo], x: Tensor, y: Any, t: Tensor,
                   outputs: dict[int, Tensor] | None = None) -> tuple[dict[int, Tensor], dict[int, Tensor], Any]:
    """(outputs, per-task mean losses, per-task targets) of one batch; the task rows come from the model's
    forward (``MultiTaskModel.task_rows`` caches them per batch), so they are computed once."""
    if outputs is None:
        outputs = model(x, t)
    rows = None if model.single_input else model.task_rows(t)
    targets = split_targets(tasks, y, rows)
    losses = {k: task_loss(tasks[k], out, targets[k]) for k, out in outputs.items()}
    return outputs, losses, targets


def progress_bar(iterable: Iterable[Any], desc: str, enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar over ``iterable``, shown only when ``enabled`` and stderr is a terminal."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=not (enabled and sys.stderr.isatty()), leave=False, **kwargs)


@torch.no_grad()
def evaluate(model: MultiTaskModel, loader: Iterable[Any], tasks: list[TaskInfo], device: torch.device,
             dist: Any = None, progress: bool = False, desc: str = "eval") -> dict[str, dict[str, float]]:
    """Metrics per task of ``model`` on ``loader``, plus each task's mean loss. Loss sums stay on the device
    until the end; under DDP (``dist``) the ranks' slices are merged (same results on every rank)."""
    model.eval()
    meters = [make_meter(task) for task in tasks]
    loss_sum = torch.zeros(len(tasks), dtype=torch.float32 if device.type == "mps" else torch.float64,
                           device=device)
    loss_n = torch.zeros(len(tasks), dtype=torch.float64)
    for batch in progress_bar(loader, desc, progress, unit="batch"):
        x, y, t = host_batch(model, batch, device)
        outputs, losses, targets = forward_losses(model, tasks, x, y, t)
        for k, out in outputs.items():
            meters[k].update(out.float(), targets[k])
            n = out.shape[0]
            loss_sum[k] += losses[k].detach().to(loss_sum.dtype) * n
            loss_n[k] += n
    loss_sum = loss_sum.cpu().double()
    if dist is not None:
        meters = dist.merge_meters(meters)
        loss_sum, loss_n = dist.all_reduce_sum(loss_sum), dist.all_reduce_sum(loss_n)
    results = {}
    for k, task in enumerate(tasks):
        if loss_n[k] == 0:
            continue
        res = meters[k].compute()
        res["loss"] = float(loss_sum[k] / loss_n[k])
        results[task.name] = res
    return results


def format_table(final: dict[str, Any], split: str = "test") -> str:
    """A per-task text table of the final metrics of ``split`` (plus the mean row)."""
    res = final[split] or final["val"]
    metrics: list[str] = []
    for r in res.values():
        metrics += [m for m in r if m not in metrics and m != "loss"]
    name_w = max([len("task"), len("mean")] + [len(n) for n in res])
    lines = [f"{'task':<{name_w}}  " + "  ".join(f"{m:>12}" for m in metrics)]
    for n, r in list(res.items()) + [("mean", mean_over_tasks(res))]:
        lines.append(f"{n:<{name_w}}  " + "  ".join(f"{r.get(m, float('nan')):>12.4f}" for m in metrics))
    return "\n".join(lines)


__all__ = ["evaluate", "format_table", "forward_losses", "progress_bar", "to_device"]
