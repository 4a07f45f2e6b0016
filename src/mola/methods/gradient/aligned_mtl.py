"""Aligned-MTL (Senushkin et al. 2023, "Independent Component Alignment for Multi-Task Learning").

With the Gram matrix K = G G^T = V diag(lambda) V^T, the gradient system is re-aligned so that all its singular
values equal sigma = sqrt(lambda_min) (condition number 1): the aligned rows are B G with
B = sqrt(lambda_min) V diag(lambda^{-1/2}) V^T, and the direction is (B G)^T w for the task preference w.
Eigenvalues below T * eps(dtype) * lambda_max are treated as zero (rank-deficient systems are aligned within
their span). Scaling convention: w defaults to all ones (the aligned gradients are SUMMED, like ``ew``);
``scale_mode`` "min" (the paper), "median" or "rmse" (mean eigenvalue) picks lambda used for sigma^2.
``aligned_mtl_ub`` does the same on the gradients of the shared representation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mola.methods.base import WEIGHTINGS
from mola.methods.gradient._solvers import combine, gram
from mola.methods.gradient.base import GradientMethod, check_options

SCALE_MODES = ("min", "median", "rmse")


def weights_from_gram(K: np.ndarray, pref: np.ndarray | None = None, scale_mode: str = "min",
                      eps: float = float(np.finfo(np.float64).eps)) -> np.ndarray:
    """Coefficients c = B w with direction = c @ G (B: the balance transformation from the Gram matrix)."""
    check_options("scale_mode", scale_mode, SCALE_MODES)
    T = K.shape[0]
    w = np.ones(T) if pref is None else np.asarray(pref, dtype=np.float64)
    lam, V = np.linalg.eigh(K)
    top = float(lam.max()) if T else 0.0
    keep = lam > max(top, 0.0) * T * eps
    if top <= 0.0 or not keep.any():
        return w
    lam, V = lam[keep], V[:, keep]
    if scale_mode == "min":
        scale = float(lam.min())
    elif scale_mode == "median":
        scale = float(np.median(lam))
    else:
        scale = float(lam.mean())
    B = np.sqrt(scale) * (V / np.sqrt(lam)) @ V.T
    return B @ w


def aggregate(G: Tensor, pref: Sequence[float] | Tensor | None = None, scale_mode: str = "min") -> Tensor:
    """Aligned-MTL direction (B G)^T pref for the rows of G; ``pref`` defaults to all ones (sum convention)."""
    p = None if pref is None else torch.as_tensor(pref, dtype=torch.float64).cpu().numpy()
    eps = float(torch.finfo(G.dtype).eps)
    return combine(weights_from_gram(gram(G), p, scale_mode, eps=eps), G)


@WEIGHTINGS.register("aligned_mtl")
class AlignedMTL(GradientMethod):
    """Aligned-MTL on the shared parameters' gradients; options ``pref`` (length T) and ``scale_mode``."""

    def __init__(self, num_tasks: int, pref: Sequence[float] | None = None, scale_mode: str = "min",
                 **options: Any) -> None:
        super().__init__(num_tasks, **options)
        check_options("scale_mode", scale_mode, SCALE_MODES)
        if pref is not None and len(pref) != num_tasks:
            raise ValueError(f"aligned_mtl: pref has {len(pref)} entries, expected {num_tasks}")
        self.pref = None if pref is None else [float(x) for x in pref]
        self.scale_mode = scale_mode

    def direction(self, G: Tensor, tasks: list[int], losses: list[Tensor]) -> Tensor:
        pref = None if self.pref is None else [self.pref[t] for t in tasks]
        return aggregate(G, pref=pref, scale_mode=self.scale_mode)


@WEIGHTINGS.register("aligned_mtl_ub")
class AlignedMTLUB(AlignedMTL):
    """Aligned-MTL-UB: the same alignment on the gradients of the shared representation."""

    needs = "rep_grads"


__all__ = ["AlignedMTL", "AlignedMTLUB", "aggregate", "weights_from_gram"]
