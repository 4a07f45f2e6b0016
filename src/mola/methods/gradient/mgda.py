"""MGDA (Désidéri 2012; Sener & Koltun 2018): the min-norm point of the convex hull of the task gradients.

``mgda`` works on the shared parameters' gradients, ``mgda_ub`` on the gradients of the shared representation
(Sener & Koltun's "upper bound" variant: T small backward passes to the representation, then one through the
encoder). The convex-hull problem is solved exactly with Wolfe's min-norm-point algorithm on the T x T Gram
matrix (not Frank-Wolfe, whose answer is only approximate).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mola.methods.base import WEIGHTINGS
from mola.methods.gradient._solvers import combine, gram, min_norm_weights
from mola.methods.gradient.base import GradientMethod, check_options

NORMALIZE = ("none", "l2", "loss", "loss+")


def normalizers(G: Tensor, normalize: str = "none", losses: Tensor | None = None) -> Tensor:
    """Per-row divisors of Sener & Koltun's gradient normalisations: 1, ||g_t||, L_t, or L_t * ||g_t||."""
    check_options("normalize", normalize, NORMALIZE)
    ones = torch.ones(G.shape[0], dtype=G.dtype, device=G.device)
    if normalize == "none":
        return ones
    norms = G.norm(dim=1)
    if normalize == "l2":
        return norms.clamp_min(1e-12)
    if losses is None:
        raise ValueError(f"normalize={normalize!r} needs the task losses")
    lv = losses.detach().to(G.dtype).reshape(-1)
    return lv.clamp_min(1e-12) if normalize == "loss" else (lv * norms).clamp_min(1e-12)


def weights(G: Tensor) -> Tensor:
    """Simplex weights alpha of the min-norm point sum_t alpha_t G_t of conv{rows of G}."""
    return torch.from_numpy(min_norm_weights(gram(G)))


def aggregate(G: Tensor, normalize: str = "none", losses: Tensor | None = None) -> Tensor:
    """Min-norm point of the convex hull of the rows of G (after dividing row t by its normaliser).

    With ``normalize`` != "none" the result is the min-norm point of the hull of the normalised rows, i.e. the
    weights found on the normalised gradients are applied to the normalised gradients.
    """
    Gn = G / normalizers(G, normalize, losses).unsqueeze(1)
    return combine(weights(Gn), Gn)


@WEIGHTINGS.register("mgda")
class MGDA(GradientMethod):
    """MGDA on the shared parameters' gradients; option ``normalize`` in none (default) / l2 / loss / loss+."""

    def __init__(self, num_tasks: int, normalize: str = "none", **options: Any) -> None:
        super().__init__(num_tasks, **options)
        check_options("normalize", normalize, NORMALIZE)
        self.normalize = normalize

    def direction(self, G: Tensor, tasks: list[int], losses: list[Tensor]) -> Tensor:
        lv = torch.stack([x.detach().to(G.dtype) for x in losses])
        return aggregate(G, normalize=self.normalize, losses=lv)


@WEIGHTINGS.register("mgda_ub")
class MGDAUB(MGDA):
    """MGDA-UB: the same min-norm direction computed on the gradients of the shared representation."""

    needs = "rep_grads"


__all__ = ["MGDA", "MGDAUB", "aggregate", "normalizers", "weights"]
