"""DomainMethod: shared helpers of the domain-generalisation methods (tasks are domains, one label space).

A domain method keeps the per-domain mean losses (their plain sum, like ``ew``) and adds a regulariser
computed from ``ctx.features`` (rows in batch order, aligned with ``ctx.task_ids`` = domain ids),
``ctx.outputs`` / ``ctx.targets`` (per-domain dicts whose rows are that domain's rows of the batch, in batch
order). ``combine`` returns the total; ``backward`` returns the regulariser values for logging.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mola.methods.base import DOMAIN_METHODS, Method, StepContext


class DomainMethod(Method):
    """Base of domain methods: ``feature_dim`` is the size of the pooled features (``flat_features``; may be None)."""

    def __init__(self, num_tasks: int, feature_dim: int | None = None, **options: Any) -> None:
        super().__init__(num_tasks, **options)
        self.feature_dim = feature_dim
        self.last_logs: dict[str, float] = {}

    def require_feature_dim(self) -> int:
        """``feature_dim`` or a ValueError naming the method (for methods that build modules on the features)."""
        if self.feature_dim is None:
            raise ValueError(f"{type(self).__name__} needs feature_dim (the channel size of the shared features)")
        return int(self.feature_dim)

    def backward(self, losses: dict[int, Tensor], ctx: StepContext) -> dict[str, Tensor | float]:
        self.last_logs = {}
        super().backward(losses, ctx)
        return dict(self.last_logs)


def flat_features(ctx: StepContext) -> Tensor:
    """``ctx.features`` as (B, F): maps (B, C, h, w), expert maps (B, E, C, h, w), tokens or experts (B, L, C) are
    average-pooled to (B, C) (as DomainBed's featurizers do), vectors kept; rows must be in batch order."""
    if ctx.features is None:
        raise ValueError("this domain method needs ctx.features (the shared representation)")
    f = ctx.features
    if f.dim() >= 4:  # (B, C, h, w) maps, or (B, E, C, h, w) expert maps (MMoE-like): pool space
        f = f.mean(dim=(-2, -1))
    if f.dim() == 3:  # (B, L, C) tokens or (B, E, C) experts: pool the middle axis
        f = f.mean(dim=1)
    feats = f if f.dim() > 1 else f.unsqueeze(1)
    if feats.shape[0] != ctx.task_ids.shape[0]:
        raise ValueError(f"features have {feats.shape[0]} rows but the batch has {ctx.task_ids.shape[0]} domain ids")
    return feats


def batch_order(per_task: Any, task_ids: Tensor) -> Tensor | None:
    """Re-assemble per-domain row blocks (dict t -> rows of domain t in batch order) into batch order.

    A plain tensor is returned as is; None when the blocks cannot be stacked (different trailing shapes).
    """
    if per_task is None:
        return None
    if isinstance(per_task, Tensor):
        return per_task
    if not isinstance(per_task, dict) or not per_task:
        return None
    blocks = {t: v for t, v in per_task.items() if isinstance(v, Tensor)}
    shapes = {tuple(v.shape[1:]) for v in blocks.values()}
    if len(shapes) != 1:
        return None
    first = next(iter(blocks.values()))
    out = first.new_zeros((task_ids.shape[0], *first.shape[1:]))
    for t, v in blocks.items():
        rows = torch.nonzero(task_ids == t).squeeze(1)
        if rows.numel() != v.shape[0]:
            return None
        out = out.index_copy(0, rows, v)
    return out


def plain_sum(losses: dict[int, Tensor]) -> Tensor:
    """Sum of the present domains' mean losses (the ERM objective of this library)."""
    return torch.stack(list(losses.values())).sum()


@DOMAIN_METHODS.register("erm")
class ERM(DomainMethod):
    """Plain sum of the per-domain losses (what the Trainer does when ``train.method`` is ``erm``)."""


__all__ = ["DomainMethod", "ERM", "batch_order", "flat_features", "plain_sum"]
