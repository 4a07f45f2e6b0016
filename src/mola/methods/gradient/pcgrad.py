"""PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning").

For each task i, walk the other tasks j in a random order and, whenever the (already projected) g_i conflicts
with the original g_j (negative inner product), remove from g_i its component along g_j. The direction is the
SUM of the projected gradients, as in the paper's Algorithm 1 (so with no conflict it equals the plain sum,
i.e. ``ew``). Implemented on the T x T Gram matrix: every projected gradient is a combination of the rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from mola.methods.base import WEIGHTINGS
from mola.methods.gradient._solvers import combine, gram, host_orders
from mola.methods.gradient.base import GradientMethod


def weights(K: np.ndarray, generator: torch.Generator | None = None) -> np.ndarray:
    """Coefficients c with direction = c @ G, given the Gram matrix K; orders from ``host_orders``."""
    T = K.shape[0]
    total = np.zeros(T)
    for i, order in enumerate(host_orders(T, generator)):
        coef = np.zeros(T)
        coef[i] = 1.0
        for j in order:
            if j == i or K[j, j] <= 0.0:
                continue
            dot = float(coef @ K[:, j])  # <current g_i, original g_j>
            if dot < 0.0:
                coef[j] -= dot / K[j, j]
        total += coef
    return total


def aggregate(G: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Sum of the PCGrad-projected rows of G; ``generator`` makes the random task orders reproducible."""
    return combine(weights(gram(G), generator), G)


@WEIGHTINGS.register("pcgrad")
class PCGrad(GradientMethod):
    """PCGrad on the shared parameters' gradients; option ``seed`` fixes the random projection orders."""

    def __init__(self, num_tasks: int, seed: int | None = None, **options: Any) -> None:
        super().__init__(num_tasks, **options)
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def direction(self, G: Tensor, tasks: list[int], losses: list[Tensor]) -> Tensor:
        return aggregate(G, generator=self.generator)


__all__ = ["PCGrad", "aggregate", "weights"]
