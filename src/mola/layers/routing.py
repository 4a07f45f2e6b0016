"""Per-forward routing state shared by all MoLA layers of one model (never a module-level global)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def check_task_ids(task_ids: Any, batch: int, low: int, high: int | None, what: str = "") -> Tensor:
    """Validate ``task_ids``: a (batch,) integer tensor with values in [low, high) (``high`` None: no bound).

    The one task-id check of the package. Type, dtype and shape errors are ValueErrors. The range check never
    syncs on an accelerator (an asynchronous assert fails the next synchronising call); on CPU it is a
    ValueError naming the bad id and ``what`` (e.g. the model's tasks)."""
    if not isinstance(task_ids, Tensor):
        raise ValueError(f"task_ids must be a torch.Tensor of shape ({batch},), got {type(task_ids).__name__}")
    if task_ids.dtype.is_floating_point or task_ids.dtype == torch.bool or task_ids.is_complex():
        raise ValueError(f"task_ids must be an integer tensor, got dtype {task_ids.dtype}")
    if tuple(task_ids.shape) != (batch,):
        raise ValueError(f"task_ids must have shape ({batch},) to match the batch, got {tuple(task_ids.shape)}")
    if not batch or torch.compiler.is_compiling():
        return task_ids
    span = f"[{low}, {high})" if high is not None else f">= {low}"
    if task_ids.device.type != "cpu":
        ok = task_ids >= low if high is None else (task_ids >= low) & (task_ids < high)
        torch._assert_async(ok.all(), f"task id out of range {span}")
        return task_ids
    lo, hi = torch.stack(torch.aminmax(task_ids)).tolist()
    if lo < low or (high is not None and hi >= high):
        raise ValueError(f"task id {lo if lo < low else hi} out of range {span}{what}")
    return task_ids


def task_groups(task_ids: Tensor, num_groups: int) -> tuple[Tensor, list[int]]:
    """(order, counts): the batch sorted by task id (stable) and the number of samples of each id.

    One host sync (the counts, which size every per-task slice); callers compute it once per batch."""
    counts = torch.bincount(task_ids, minlength=num_groups).tolist()
    if len(counts) > num_groups:
        raise ValueError(f"task id {len(counts) - 1} out of range [0, {num_groups})")
    return torch.argsort(task_ids, stable=True), counts


@dataclass
class Routing:
    """What the last forward routed: set once per forward by the model, read by every MoLA layer.

    ``task_ids`` (B,) int64 selects one adapter per sample (MoLA-Grad); ``weights`` (B, E) mixes them
    (MoLA-Router or an explicit override). ``dense`` says which of the two the layers must use.
    """

    num_experts: int
    weights: Tensor | None = None
    logits: Tensor | None = None
    z: Tensor | None = None
    task_ids: Tensor | None = None
    dense: bool = False
    _groups: tuple[Tensor, Tensor, list[int]] | None = field(default=None, repr=False)

    def clear(self) -> None:
        self.weights = self.logits = self.z = self.task_ids = None
        self.dense = False
        self._groups = None

    def set_task_ids(self, task_ids: Tensor, groups: tuple[Tensor, list[int]] | None = None) -> None:
        """Route each sample to its own adapter (exact one-hot, no softmax); ``groups``: ``task_groups`` of
        ``task_ids`` when the caller already computed them (saves the host sync)."""
        self.clear()
        self.task_ids = task_ids
        self.dense = False
        if groups is not None:
            self._groups = self._with_inverse(*groups)

    @staticmethod
    def _with_inverse(order: Tensor, counts: list[int]) -> tuple[Tensor, Tensor, list[int]]:
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return order, inverse, counts

    def set_weights(self, weights: Tensor, task_ids: Tensor | None = None) -> None:
        """Mix all adapters per sample with ``weights`` (B, E)."""
        self.clear()
        self.weights = weights
        self.task_ids = task_ids
        self.dense = True

    @property
    def batch_size(self) -> int:
        ref = self.weights if self.dense else self.task_ids
        if ref is None:
            raise RuntimeError("MoLA layer called before the model set its routing (call the MoLAModel)")
        return int(ref.shape[0])

    def mixing(self) -> Tensor:
        """(B, E) mixing weights; one-hot of the task ids in task mode."""
        if self.dense:
            assert self.weights is not None
            return self.weights
        if self.task_ids is None:
            raise RuntimeError("MoLA layer called before the model set its routing (call the MoLAModel)")
        return torch.nn.functional.one_hot(self.task_ids, self.num_experts)

    def groups(self) -> tuple[Tensor, Tensor, list[int]]:
        """(order, inverse, counts) grouping samples by task, computed once per forward for all layers.

        ``order`` sorts the batch by task id (stable), ``inverse`` undoes it, ``counts[e]`` is the number of
        samples of task e. One host sync per forward, not one per layer.
        """
        if self._groups is None:
            assert self.task_ids is not None
            self._groups = self._with_inverse(*task_groups(self.task_ids, self.num_experts))
        return self._groups
