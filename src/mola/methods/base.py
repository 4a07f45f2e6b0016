"""The interface between the training loop and any loss-weighting, gradient or domain method.

The Trainer calls, once per step, ``method.backward(losses, ctx)`` with the per-task mean losses of the batch
(tasks absent from the batch are not in the dict) and then steps the optimizer. A method only decides how the
per-task losses become gradients; it never touches the optimizer, the data or the architecture.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from mola.registry import Registry


class Collectives(Protocol):
    """What a method may use of the Trainer's distributed context (``mola.engine.distributed.DistContext``)."""

    rank: int
    world_size: int

    def all_reduce_sum(self, x: Tensor) -> Tensor:
        """Sum of ``x`` over ranks (a new tensor)."""
        ...

    def broadcast_(self, x: Tensor, src: int = 0) -> Tensor:
        """Overwrite ``x`` in place with rank ``src``'s value."""
        ...

    def gather_rows(self, x: Tensor) -> Tensor:
        """Rows of every rank concatenated in rank order, autograd-aware."""
        ...

    def row_counts(self, n: int) -> list[int]:
        """Every rank's number of local rows."""
        ...


@dataclass
class StepContext:
    """What a method may read during one training step.

    ``shared_params``: parameters every task updates (backbone W0, MoLA router and lift, gates...), whose per-task
    gradients gradient methods combine; ``task_params``: parameters that belong to one task (heads, MoLA-Grad
    adapters, towers; router-mode adapters are shared) plus method modules.
    ``features``: the shared representation the heads read (for "-UB" methods), part of the graph.
    ``outputs`` / ``targets``: per-task predictions and targets of the present tasks, rows aligned.
    ``extra_loss``: a term added to the objective that is not a task loss (lambda * TwD in router mode).
    ``dist``: under DDP (docs/distributed.md) the collectives of the run, else None. The losses are then global
    (value: the global batch's mean, identical on every rank) but their gradients reach only this rank's rows,
    and DDP averages the model's gradients after ``backward``; methods that read gradients or draw random
    numbers use ``dist`` to agree across ranks.
    """

    model: nn.Module
    shared_params: list[nn.Parameter]
    task_params: list[nn.Parameter]
    task_ids: Tensor
    num_tasks: int
    features: Tensor | None = None
    outputs: dict[int, Tensor] = field(default_factory=dict)
    targets: Any = None
    extra_loss: Tensor | None = None
    epoch: int = 0
    step: int = 0
    dist: Collectives | None = None


class Method(nn.Module):
    """Base class. Subclasses override ``combine`` (loss weighting / domain terms) or ``backward`` (gradient
    methods). A method is an nn.Module so that trainable parts (a domain discriminator) reach the optimizer
    and its state (DWA's loss history, GradNorm's weights) is checkpointed with the model.
    """

    #: "losses" (works on the loss values), "grads" (needs per-task gradients of the shared parameters) or
    #: "rep_grads" (needs per-task gradients of the shared representation, the "-UB" variants).
    needs = "losses"

    def __init__(self, num_tasks: int, **options: Any) -> None:
        super().__init__()
        if options:
            raise ValueError(f"{type(self).__name__} got unknown options {sorted(options)}")
        self.num_tasks = num_tasks

    def combine(self, losses: dict[int, Tensor], ctx: StepContext) -> Tensor:
        """One scalar to back-propagate: the plain sum of the present tasks' losses by default
        (docs/methods/weighting.md)."""
        return torch.stack(list(losses.values())).sum()

    def backward(self, losses: dict[int, Tensor], ctx: StepContext) -> Mapping[str, Tensor | float]:
        """Fill ``.grad`` of every trainable parameter; returns numbers worth logging (task weights, ...) as
        0-d tensors left on their device: the Trainer averages them and reads them once per logging interval
        into metrics.csv (``method/<name>``) and TensorBoard, so returning them costs no host sync."""
        total = self.combine(losses, ctx)
        if ctx.extra_loss is not None:
            total = total + ctx.extra_loss
        total.backward()
        return {}

    def on_epoch_end(self, epoch: int, mean_losses: dict[int, float]) -> None:
        """Hook for methods that adapt between epochs (DWA)."""


WEIGHTINGS: Registry[type[Method]] = Registry("weighting")
DOMAIN_METHODS: Registry[type[Method]] = Registry("method")
