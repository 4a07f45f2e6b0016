"""Per-forward routing state shared by all MoLA layers of one model (never a module-level global)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


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

    def set_task_ids(self, task_ids: Tensor) -> None:
        """Route each sample to its own adapter (exact one-hot, no softmax)."""
        self.clear()
        self.task_ids = task_ids
        self.dense = False

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
            ids = self.task_ids
            order = torch.argsort(ids, stable=True)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=order.device)
            counts = torch.bincount(ids, minlength=self.num_experts).tolist()
            self._groups = (order, inverse, counts)
        return self._groups
