"""GradNorm (Chen et al. 2018): learnable task weights that balance the tasks' gradient norms.

Weights w_t are a parameter of this method (they reach the optimizer). Each step: renormalise w to be positive
and sum to T (the paper renormalises after every update; doing it at the start of the next step is the same),
train the model on sum_t w_t L_t (w detached), and give w the gradient of
    L_grad = sum_t | w_t ||grad_W L_t|| - mean_s(w_s ||grad_W L_s||) * r_t^alpha |,
with r_t = (L_t / L_t(0)) / mean_s(L_s / L_s(0)) the relative inverse training rate (the target is a
constant). W is the shared REPRESENTATION (``ctx.features``) by default — architecture-agnostic and one
cheap backward per task; ``wrt="last_shared"`` uses the last multi-dimensional shared parameter (the paper's
"last shared layer") instead, also the fallback when no features are given. Because w_t ||grad_W L_t|| is
linear in w_t, no double back-propagation is needed. L_t(0) is a task's first observed loss (a buffer).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from mola.methods.base import WEIGHTINGS, Collectives, Method, StepContext

WRT = ("features", "last_shared")


def _grad_norm(loss: Tensor, target: Tensor) -> Tensor:
    """||d loss / d target|| (0 when the loss does not reach the target), detached."""
    (g,) = torch.autograd.grad(loss, target, retain_graph=True, allow_unused=True)
    return loss.new_zeros(()) if g is None else g.detach().norm()


def _global_grad_norms(losses: list[Tensor], target: Tensor, per_row: bool, dist: Collectives) -> Tensor:
    """Under DDP, the norms of the GLOBAL batch's gradients: the losses carry a world-size factor, so the global
    gradient is the ranks' representation rows concatenated (``per_row``) or their mean (a shared parameter),
    divided by the world size."""
    rows = []
    for loss in losses:
        (g,) = torch.autograd.grad(loss, target, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(target).reshape(-1) if g is None else g.detach().reshape(-1))
    G = torch.stack(rows).double()
    if per_row:
        return dist.all_reduce_sum(G.pow(2).sum(dim=1)).sqrt() / dist.world_size
    return (dist.all_reduce_sum(G) / dist.world_size).norm(dim=1)


@WEIGHTINGS.register("gradnorm")
class GradNorm(Method):
    """GradNorm with asymmetry ``alpha`` (1.5) and gradient norms w.r.t. ``wrt`` (features / last_shared)."""

    def __init__(self, num_tasks: int, alpha: float = 1.5, wrt: str = "features", min_weight: float = 1e-3,
                 **options: Any) -> None:
        super().__init__(num_tasks, **options)
        if wrt not in WRT:
            raise ValueError(f"gradnorm: unknown wrt {wrt!r}; accepted: {', '.join(WRT)}")
        self.alpha, self.wrt, self.min_weight = float(alpha), wrt, float(min_weight)
        self.task_weights = nn.Parameter(torch.ones(num_tasks))
        self.register_buffer("initial_losses", torch.full((num_tasks,), math.nan))

    @torch.no_grad()
    def renormalize(self) -> None:
        """Clamp the weights to >= min_weight and rescale them to sum to T (in place)."""
        w = self.task_weights
        w.clamp_(min=self.min_weight)
        w.mul_(self.num_tasks / w.sum())

    def weights(self) -> Tensor:
        """The normalised weights (positive, summing to T) without changing the parameter."""
        w = self.task_weights.detach().clamp(min=self.min_weight)
        return w * (self.num_tasks / w.sum())

    def _target(self, ctx: StepContext) -> Tensor:
        if self.wrt == "features" and ctx.features is not None and ctx.features.requires_grad:
            return ctx.features
        params = [p for p in ctx.shared_params if p.requires_grad]
        if not params:
            raise ValueError("gradnorm needs ctx.features or trainable shared parameters")
        multi = [p for p in params if p.dim() > 1]
        return (multi or params)[-1]

    def backward(self, losses: dict[int, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        """Model gradients of sum_t w_t L_t (+ extra loss); the weights' gradient from the GradNorm loss."""
        self.renormalize()
        tasks = sorted(losses)
        w = self.task_weights
        L = torch.stack([losses[t].detach().float() for t in tasks])
        idx = torch.tensor(tasks, device=w.device)
        with torch.no_grad():
            init = self.initial_losses
            at = idx.to(init.device)
            cur = init.index_select(0, at)  # a task's first loss becomes its initial loss (no host sync)
            init.index_copy_(0, at, torch.where(torch.isnan(cur), L.to(init), cur))
        if len(tasks) > 1:
            target = self._target(ctx)
            if ctx.dist is None:
                norms = torch.stack([_grad_norm(losses[t], target) for t in tasks]).to(w.dtype)
            else:
                norms = _global_grad_norms([losses[t] for t in tasks], target, target is ctx.features,
                                           ctx.dist).to(w)
            wp = w.index_select(0, idx)
            gw = wp * norms
            rate = L.to(w.dtype) / self.initial_losses.index_select(0, idx.to(init.device)).to(w)
            rate = rate / rate.mean().clamp_min(1e-12)
            goal = (gw.mean() * rate.pow(self.alpha)).detach()
            (grad,) = torch.autograd.grad((gw - goal).abs().sum(), w)
            w.grad = grad if w.grad is None else w.grad + grad
        wd = w.detach()
        total = ctx.extra_loss
        for t in tasks:
            part = wd[t].to(losses[t]) * losses[t]
            total = part if total is None else total + part
        if total is not None:
            total.backward()
        return {f"w{t}": wd[t] for t in tasks}


__all__ = ["GradNorm"]
