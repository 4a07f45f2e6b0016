"""CAGrad (Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning").

With g0 the AVERAGE gradient and r = c ||g0||, CAGrad maximises the worst task improvement within the ball
||d - g0|| <= r. Its dual is  min_{w in simplex} g_w . g0 + r ||g_w||  (g_w = sum_t w_t g_t), a convex problem
over the T-simplex that we solve ourselves on the Gram matrix: accelerated projected gradient, then an exact
polish on the detected support (the KKT system on a face reduces to a quadratic in its multiplier). The
direction is d = g0 + (r / ||g_w||) g_w, divided by (1 + c^2) when ``rescale`` = 1 (the paper code's default),
by (1 + c) when 2, unscaled when 0. Scale: like g0, about 1/T of the summed gradient used by ``ew``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from mola.methods.base import WEIGHTINGS
from mola.methods.gradient._solvers import combine, gram, minimize_on_simplex
from mola.methods.gradient.base import GradientMethod, check_options


def _objective(Kn: np.ndarray, b: np.ndarray, r: float, w: np.ndarray) -> float:
    return float(w @ b + r * np.sqrt(max(float(w @ Kn @ w), 0.0)))


def _polish(Kn: np.ndarray, b: np.ndarray, r: float, w: np.ndarray) -> np.ndarray:
    """Solve the KKT conditions exactly on the support of ``w``; keep ``w`` unless that does better."""
    support = np.flatnonzero(w > 1e-9)
    Ks, bs = Kn[np.ix_(support, support)], b[support]
    try:
        p = np.linalg.solve(Ks, np.ones(len(support)))
        q = np.linalg.solve(Ks, bs)
    except np.linalg.LinAlgError:
        return w
    a2, a1, a0 = float(p.sum()), float(q.sum()), float(bs @ q - r * r)
    disc = a1 * a1 - a2 * a0
    if a2 <= 0 or disc < 0:
        return w
    mu = (a1 + np.sqrt(disc)) / a2
    denom = mu * a2 - a1
    if denom <= 0:
        return w
    cand = np.zeros_like(w)
    cand[support] = (mu * p - q) / denom  # (n / r)(mu p - q) with n / r = 1 / denom
    if np.any(cand < -1e-12) or abs(cand.sum() - 1.0) > 1e-9:
        return w
    cand = np.clip(cand, 0.0, None)
    cand /= cand.sum()
    return cand if _objective(Kn, b, r, cand) <= _objective(Kn, b, r, w) + 1e-15 else w


def _kkt_ok(w: np.ndarray, grad: np.ndarray, tol: float = 1e-10) -> bool:
    """KKT on the simplex: equal partial derivatives on the support, no smaller one outside it."""
    support = w > 0
    mu = float(grad[support].mean())
    return bool(np.all(np.abs(grad[support] - mu) <= tol) and np.all(grad[~support] >= mu - tol))


def weights_from_gram(K: np.ndarray, c: float = 0.4, rescale: int = 1) -> np.ndarray:
    """Coefficients of the CAGrad direction in the rows (direction = coefficients @ G)."""
    T = K.shape[0]
    mean = np.full(T, 1.0 / T)
    scale = float(np.max(np.diag(K))) if T else 0.0
    if c > 0 and np.isfinite(scale) and scale > 0:
        Kn = K / scale
        b = Kn @ mean
        g0_sq = float(mean @ b)
        r = c * np.sqrt(max(g0_sq, 0.0))
        if r > 0:

            def fun_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
                kw = Kn @ w
                n = np.sqrt(max(float(w @ kw), 1e-30))
                return float(w @ b + r * n), b + r * kw / n

            w = mean.copy()
            for tol in (1e-8, 1e-11, 1e-14):  # coarse solve to find the support, exact polish, check KKT
                w = _polish(Kn, b, r, minimize_on_simplex(fun_grad, w, tol=tol))
                if _kkt_ok(w, fun_grad(w)[1]):
                    break
            gw = np.sqrt(max(float(w @ Kn @ w), 0.0))
            if gw > 1e-12:
                mean = mean + (r / gw) * w
    divisor = {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[rescale]
    return mean / divisor


def aggregate(G: Tensor, c: float = 0.4, rescale: int = 1) -> Tensor:
    """CAGrad direction of the rows of G (c: radius factor; rescale 0 / 1 / 2 as in the module docstring)."""
    check_options("rescale", rescale, (0, 1, 2))
    if c < 0:
        raise ValueError(f"cagrad: c must be >= 0, got {c}")
    return combine(weights_from_gram(gram(G), c, rescale), G)


@WEIGHTINGS.register("cagrad")
class CAGrad(GradientMethod):
    """CAGrad on the shared parameters' gradients; options ``c`` (0.4) and ``rescale`` (1)."""

    def __init__(self, num_tasks: int, c: float = 0.4, rescale: int = 1, **options: Any) -> None:
        super().__init__(num_tasks, **options)
        check_options("rescale", rescale, (0, 1, 2))
        if c < 0:
            raise ValueError(f"cagrad: c must be >= 0, got {c}")
        self.c, self.rescale = float(c), int(rescale)

    def direction(self, G: Tensor, tasks: list[int], losses: list[Tensor]) -> Tensor:
        return aggregate(G, c=self.c, rescale=self.rescale)


__all__ = ["CAGrad", "aggregate", "weights_from_gram"]
