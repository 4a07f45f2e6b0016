"""MoCo (Fernando et al. 2023, "Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent
Approach") — the multi-task gradient method, not momentum contrast.

Per step k, with the stochastic task gradients G_k:
    Y_{k+1}   = Y_k - beta_k (Y_k - G_k)                                   (tracked gradient estimates)
    lam_{k+1} = Proj_simplex(lam_k - gamma_k (Y_{k+1} Y_{k+1}^T + rho I) lam_k)
    d_k       = Y_{k+1}^T lam_{k+1}
with beta_k = beta / k^beta_sigma and gamma_k = gamma / k^gamma_sigma (sigma = 0: constant steps). A task's
tracked row starts at its first observed gradient (so Y is unbiased from the first step); lam starts uniform.
Absent tasks keep their rows; lam is updated on the present tasks' face (their weights renormalised, updated,
then scaled back to their previous total mass). Y, lam and k live in buffers (checkpointed); Y is T x D with D
the number of shared parameters, sized at the first step.
Simplification: the paper's projection of Y onto a bounded set is omitted (it only matters for the analysis).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from mola.methods.base import WEIGHTINGS
from mola.methods.gradient._solvers import combine, gram, project_simplex
from mola.methods.gradient.base import GradientMethod


def aggregate(G: Tensor, y: Tensor | None = None, lam: Tensor | None = None, beta: float = 0.5,
              gamma: float = 0.1, rho: float = 0.0) -> Tensor:
    """One MoCo step; ``y`` (T x D) and ``lam`` (T, on the simplex) are updated in place when given.

    Without ``y`` the tracked estimates start at G; without ``lam`` the weights start uniform.
    """
    T = G.shape[0]
    if y is None:
        Y = G.detach().clone()
    else:
        y.sub_(beta * (y - G.detach().to(y.dtype)))
        Y = y
    lam_np = np.full(T, 1.0 / T) if lam is None else lam.detach().cpu().to(torch.float64).numpy()
    K = gram(Y)
    new = project_simplex(lam_np - gamma * (K + rho * np.eye(T)) @ lam_np)
    if lam is not None:
        lam.copy_(torch.from_numpy(new).to(lam))
    return combine(new, Y).to(G.dtype)


@WEIGHTINGS.register("moco")
class MoCo(GradientMethod):
    """MoCo on the shared parameters' gradients; options beta (0.5), beta_sigma (0.5), gamma (0.1),
    gamma_sigma (0.5), rho (0.0)."""

    def __init__(self, num_tasks: int, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1,
                 gamma_sigma: float = 0.5, rho: float = 0.0, **options: Any) -> None:
        super().__init__(num_tasks, **options)
        if not 0.0 < beta <= 1.0 or gamma <= 0 or rho < 0 or beta_sigma < 0 or gamma_sigma < 0:
            raise ValueError("moco: need 0 < beta <= 1, gamma > 0, rho >= 0 and sigmas >= 0")
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.gamma, self.gamma_sigma = float(gamma), float(gamma_sigma)
        self.rho = float(rho)
        self.register_buffer("y", torch.zeros(0))
        self.register_buffer("seen", torch.zeros(num_tasks, dtype=torch.bool))
        self.register_buffer("lam", torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "y")
        if saved is not None and saved.shape != self.y.shape:  # the lazily sized tracker
            self.y = torch.zeros_like(saved, device=self.y.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def direction(self, G: Tensor, tasks: list[int], losses: list[Tensor]) -> Tensor:
        if self.y.shape != (self.num_tasks, G.shape[1]):
            self.y = torch.zeros(self.num_tasks, G.shape[1], dtype=G.dtype, device=G.device)
            self.seen.zero_()
        self.steps += 1
        k = float(self.steps)
        beta = self.beta / k**self.beta_sigma
        gamma = self.gamma / k**self.gamma_sigma
        idx = torch.tensor(tasks, device=self.y.device)
        y = self.y.index_select(0, idx)
        fresh = ~self.seen.index_select(0, idx)
        y[fresh] = G.detach()[fresh].to(y.dtype)  # first sighting: the estimate starts at the gradient
        lam = self.lam.index_select(0, idx)
        mass = float(lam.sum())
        lam = lam / mass if mass > 0 else torch.full_like(lam, 1.0 / len(tasks))
        d = aggregate(G, y=y, lam=lam, beta=beta, gamma=gamma, rho=self.rho)
        self.y.index_copy_(0, idx, y)
        self.seen.index_fill_(0, idx, True)
        self.lam.index_copy_(0, idx, lam * mass)  # a face with no mass keeps none (lam stays on the simplex)
        return d


__all__ = ["MoCo", "aggregate"]
