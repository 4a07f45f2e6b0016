"""IMTL (Liu et al. 2021, "Towards Impartial Multi-task Learning"), the hybrid of IMTL-G and IMTL-L.

IMTL-L: every task loss becomes e^{s_t} L_t - s_t with a learnable scale s_t (a parameter of this method, so it
reaches the optimizer; its gradient is e^{s_t} L_t - 1). IMTL-G: the shared direction is g = sum_t alpha_t g_t
with sum_t alpha_t = 1 and equal projections of g onto every unit gradient u_t = g_t / ||g_t||. With the Gram
matrix K = G G^T that condition reads K alpha = c * (||g_t||)_t, so alpha = K^+ n / 1^T K^+ n — the paper's
closed form alpha_{2:T} = g_1 U^T (D U^T)^{-1} written without choosing a reference task (and defined, via
the pseudo-inverse, when rows are linearly dependent). The gradients are those of the scaled losses and are
taken w.r.t. the shared parameters (the paper's cheaper choice, the shared representation, is not offered).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mola.methods.base import WEIGHTINGS, StepContext
from mola.methods.gradient._solvers import combine, gram
from mola.methods.gradient.base import GradientMethod


def weights_from_gram(K: np.ndarray) -> np.ndarray:
    """IMTL-G weights (summing to 1; all zero when no impartial direction exists) from the Gram matrix."""
    norms = np.sqrt(np.clip(np.diag(K), 0.0, None))
    v = np.linalg.pinv(K, rcond=1e-12, hermitian=True) @ norms
    s = float(v.sum())
    if not np.isfinite(s) or abs(s) < 1e-12 * max(1.0, float(np.abs(v).max(initial=0.0))):
        return np.zeros_like(v)
    return v / s


def aggregate(G: Tensor) -> Tensor:
    """IMTL-G direction: the combination of the rows (weights summing to 1) equally projected on each row."""
    return combine(weights_from_gram(gram(G)), G)


@WEIGHTINGS.register("imtl")
class IMTL(GradientMethod):
    """Hybrid IMTL: learnable loss scales (IMTL-L, option ``learn_scales``) + the IMTL-G shared direction."""

    def __init__(self, num_tasks: int, learn_scales: bool = True, **options: Any) -> None:
        super().__init__(num_tasks, **options)
        self.learn_scales = learn_scales
        self.log_scales = nn.Parameter(torch.zeros(num_tasks), requires_grad=learn_scales)

    def task_losses(self, losses: dict[int, Tensor], ctx: StepContext) -> dict[int, Tensor]:
        if not self.learn_scales:
            return losses
        s = self.log_scales
        return {t: torch.exp(s[t]) * loss - s[t] for t, loss in losses.items()}

    def direction(self, G: Tensor, tasks: list[int], losses: list[Tensor]) -> Tensor:
        return aggregate(G)


__all__ = ["IMTL", "aggregate", "weights_from_gram"]
