"""Nash-MTL (Navon et al. 2022, "Multi-Task Learning as a Bargaining Game").

The Nash bargaining solution is d = G^T alpha with alpha > 0 solving (G G^T alpha)_t = 1 / alpha_t for every
task. That system is exactly the stationarity condition of the strictly convex potential
    f(alpha) = 1/2 alpha^T K alpha - sum_t log alpha_t,   K = G G^T,
so we minimise f with a damped Newton method (positivity kept by the line search) instead of the paper's
sequence of convex (CCP) sub-problems solved with cvxpy. Simplifications vs the paper's code: the solution is
computed to convergence at every step (no "update every k steps"), a ridge ``reg`` * max_t ||g_t||^2 is added
to K so that linearly dependent gradients (where no solution exists, e.g. two opposite gradients) still give
a finite answer, and the norm clipping of the direction (``max_norm``) is off by default.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from mola.methods.base import WEIGHTINGS
from mola.methods.gradient._solvers import combine, gram
from mola.methods.gradient.base import GradientMethod


def nash_weights(K: np.ndarray, reg: float = 1e-8, max_iter: int = 100, tol: float = 1e-14) -> np.ndarray:
    """alpha > 0 with (K alpha)_t = 1 / alpha_t, by Newton's method on f(alpha) = alpha'K alpha/2 - sum log alpha."""
    T = K.shape[0]
    scale = float(np.max(np.diag(K))) if T else 0.0
    if not np.isfinite(scale) or scale <= 0.0:
        return np.zeros(T)
    Kn = K / scale + reg * np.eye(T)

    def f(a: np.ndarray) -> float:
        return float(0.5 * a @ Kn @ a - np.log(a).sum())

    a = 1.0 / np.sqrt(np.diag(Kn))
    fa = f(a)
    for _ in range(max_iter):
        grad = Kn @ a - 1.0 / a
        step = np.linalg.solve(Kn + np.diag(1.0 / a**2), grad)
        decrement = float(grad @ step)
        if decrement / 2.0 <= tol:
            break
        t = 1.0
        while np.any(a - t * step <= 0.0):
            t *= 0.5
        while True:
            new = a - t * step
            f_new = f(new)
            if f_new <= fa - 0.25 * t * decrement or t < 1e-12:
                break
            t *= 0.5
        a, fa = new, f_new
    return a / np.sqrt(scale)


def weights(G: Tensor, max_norm: float = 0.0, reg: float = 1e-8) -> Tensor:
    """Nash bargaining weights alpha (rescaled so that ||alpha @ G|| <= max_norm when max_norm > 0)."""
    alpha = torch.from_numpy(nash_weights(gram(G), reg=reg))
    if max_norm > 0:
        norm = float(combine(alpha, G).norm())
        if norm > max_norm:
            alpha = alpha * (max_norm / norm)
    return alpha


def aggregate(G: Tensor, max_norm: float = 0.0, reg: float = 1e-8) -> Tensor:
    """Nash-MTL direction G^T alpha with (G G^T alpha) * alpha = 1 elementwise."""
    return combine(weights(G, max_norm=max_norm, reg=reg), G)


@WEIGHTINGS.register("nash_mtl")
class NashMTL(GradientMethod):
    """Nash-MTL on the shared parameters' gradients; options ``max_norm`` (0 = no clipping) and ``reg``."""

    def __init__(self, num_tasks: int, max_norm: float = 0.0, reg: float = 1e-8, **options: Any) -> None:
        super().__init__(num_tasks, **options)
        if max_norm < 0 or reg < 0:
            raise ValueError(f"nash_mtl: max_norm and reg must be >= 0, got {max_norm}, {reg}")
        self.max_norm = float(max_norm)
        self.reg = float(reg)

    def direction(self, G: Tensor, tasks: list[int], losses: list[Tensor]) -> Tensor:
        return aggregate(G, max_norm=self.max_norm, reg=self.reg)


__all__ = ["NashMTL", "aggregate", "nash_weights", "weights"]
