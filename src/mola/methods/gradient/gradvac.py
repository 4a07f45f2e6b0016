"""GradVac (Wang et al. 2021, "Gradient Vaccine"), applied to the whole shared parameter vector.

For each task i and each other task j (random order): phi_ij = cos(g_i', g_j) between the current modified
g_i' and the original g_j; if phi_ij is below the EMA target phi^_ij, add to g_i' the multiple of g_j that
raises the cosine exactly to the target:
    g_i' += ||g_i'|| (phi^ sqrt(1 - phi^2) - phi sqrt(1 - phi^^2)) / (||g_j|| sqrt(1 - phi^^2)) * g_j,
then update phi^_ij <- (1 - beta) phi^_ij + beta phi_ij. Targets start at 0 (so the first step is PCGrad);
the direction is the SUM of the modified gradients. The targets live in a T x T buffer (checkpointed).
Simplification: one target per task pair for the whole model (the paper also uses per-layer targets).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from mola.methods.base import WEIGHTINGS
from mola.methods.gradient._solvers import combine, gram, host_orders
from mola.methods.gradient.base import GradientMethod


def weights(K: np.ndarray, targets: np.ndarray, beta: float = 0.5, eps: float = 1e-8,
            generator: torch.Generator | None = None) -> np.ndarray:
    """Coefficients c with direction = c @ G; ``targets`` (T x T, the EMA phi^) is updated in place."""
    T = K.shape[0]
    coefs = np.eye(T)
    for i, order in enumerate(host_orders(T, generator)):
        for j in order:
            if j == i:
                continue
            c = coefs[i]
            dot = float(c @ K[:, j])
            norm_i = float(np.sqrt(max(float(c @ K @ c), 0.0)))
            norm_j = float(np.sqrt(max(K[j, j], 0.0)))
            phi = dot / (norm_i * norm_j + eps)
            target = float(targets[i, j])
            if phi < target:
                s_phi = np.sqrt(max(1.0 - phi * phi, 0.0))
                s_target = np.sqrt(max(1.0 - target * target, 0.0))
                coefs[i, j] += norm_i * (target * s_phi - phi * s_target) / (norm_j * s_target + eps)
            targets[i, j] = (1.0 - beta) * target + beta * phi
    return coefs.sum(axis=0)


def aggregate(G: Tensor, targets: Tensor | None = None, beta: float = 0.5, eps: float = 1e-8,
              generator: torch.Generator | None = None) -> Tensor:
    """GradVac direction of the rows of G; ``targets`` (T x T tensor, phi^) is updated in place if given."""
    T = G.shape[0]
    if targets is None:
        K, tgt = gram(G), np.zeros((T, T))
    else:  # the Gram matrix and the EMA targets come to the host in one read
        Gd = G.detach().to(torch.float64)
        both = torch.stack([Gd @ Gd.T, targets.detach().to(Gd)]).cpu().numpy()
        K, tgt = both[0], both[1].copy()
    c = weights(K, tgt, beta=beta, eps=eps, generator=generator)
    if targets is not None:
        targets.copy_(torch.from_numpy(tgt).to(targets))
    return combine(c, G)


@WEIGHTINGS.register("gradvac")
class GradVac(GradientMethod):
    """GradVac on the shared parameters' gradients; options ``beta`` (EMA, 0.5), ``eps``, ``seed``."""

    def __init__(self, num_tasks: int, beta: float = 0.5, eps: float = 1e-8, seed: int | None = None,
                 **options: Any) -> None:
        super().__init__(num_tasks, **options)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"gradvac: beta must be in [0, 1], got {beta}")
        self.beta, self.eps = float(beta), float(eps)
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.register_buffer("targets", torch.zeros(num_tasks, num_tasks, dtype=torch.float64))

    def direction(self, G: Tensor, tasks: list[int], losses: list[Tensor]) -> Tensor:
        idx = torch.tensor(tasks, device=self.targets.device)
        sub = self.targets.index_select(0, idx).index_select(1, idx).clone()
        d = aggregate(G, targets=sub, beta=self.beta, eps=self.eps, generator=self.generator)
        rows = idx.view(-1, 1).expand(-1, len(tasks))
        cols = idx.view(1, -1).expand(len(tasks), -1)
        self.targets[rows, cols] = sub
        return d


__all__ = ["GradVac", "aggregate", "weights"]
