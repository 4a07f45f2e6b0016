"""DANN (Ganin et al. 2016): domain-adversarial training through a gradient-reversal layer (GRL).

A small MLP classifier predicts each sample's domain (``ctx.task_ids``) from the flattened shared features seen
through a GRL: the classifier minimises the domain cross-entropy, while the features receive -lam times its
gradient and so learn to confuse it. Total = sum of the per-domain losses + weight * domain CE; one backward
trains everything. ``lam`` is constant (Ganin's 2/(1+exp(-10p))-1 ramp is not applied).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mola.methods.base import DOMAIN_METHODS, StepContext
from mola.methods.domain.base import DomainMethod, flat_features, plain_sum


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, lam: float) -> Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.lam * grad, None


def grad_reverse(x: Tensor, lam: float = 1.0) -> Tensor:
    """Identity forward; multiplies the incoming gradient by -lam backward."""
    return _GradReverse.apply(x, lam)


def mlp(in_dim: int, hidden: int, out_dim: int, depth: int = 1) -> nn.Sequential:
    """in -> (Linear, ReLU) x depth -> Linear out."""
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


@DOMAIN_METHODS.register("dann")
class DANN(DomainMethod):
    """DANN; options ``lam`` (GRL coefficient, 1.0), ``weight`` (domain-loss weight, 1.0), ``hidden`` (256),
    ``depth`` (hidden layers, 1). Needs ``feature_dim``."""

    def __init__(self, num_tasks: int, feature_dim: int | None = None, lam: float = 1.0, weight: float = 1.0,
                 hidden: int = 256, depth: int = 1, **options: Any) -> None:
        super().__init__(num_tasks, feature_dim, **options)
        self.lam, self.weight = float(lam), float(weight)
        self.discriminator = mlp(self.require_feature_dim(), hidden, num_tasks, depth)

    def domain_loss(self, ctx: StepContext) -> Tensor:
        """Cross-entropy of the domain classifier on the gradient-reversed features."""
        feats = flat_features(ctx)
        logits = self.discriminator(grad_reverse(feats, self.lam).to(self.discriminator[0].weight.dtype))
        return F.cross_entropy(logits, ctx.task_ids.long())

    def combine(self, losses: dict[int, Tensor], ctx: StepContext) -> Tensor:
        dom = self.domain_loss(ctx)
        self.last_logs["domain_loss"] = float(dom.detach())
        return plain_sum(losses) + self.weight * dom


__all__ = ["DANN", "grad_reverse", "mlp"]
