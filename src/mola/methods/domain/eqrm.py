"""EQRM (Eastwood et al. 2022, "Probable Domain Generalization via Quantile Risk Minimization").

The objective is the alpha-quantile of the distribution of per-domain risks, estimated from the batch's
per-domain mean losses. With ``kde`` (default) the distribution is a Gaussian kernel density estimate of the
risks (bandwidth ``bandwidth`` or Silverman's rule 0.9 min(std, IQR/1.34) n^(-1/5)); its alpha-quantile q
solves mean_i Phi((q - r_i) / h) = alpha, found by bisection, and is made differentiable by the implicit
function theorem: dq/dr_i = phi((q - r_i)/h) / sum_j phi((q - r_j)/h) (h held constant). Without ``kde`` the
empirical (linearly interpolated) quantile is used. For the first ``burnin`` steps the objective is ERM (the
mean risk). Scale: ``reduction="mean"`` (default) is the paper's risk scale — 1/T of ``ew``'s summed losses;
``"sum"`` multiplies by the number of present domains. Simplification: the optimizer is not reset after the
burn-in (the engine owns it).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mola.methods.base import DOMAIN_METHODS, StepContext
from mola.methods.domain.base import DomainMethod


def silverman_bandwidth(r: Tensor) -> float:
    """0.9 * min(std, IQR / 1.34) * n^(-1/5) (std alone when the IQR is zero); 0 for constant risks."""
    n = r.numel()
    if n < 2:
        return 0.0
    std = float(r.std())
    iqr = float(torch.quantile(r, 0.75) - torch.quantile(r, 0.25))
    spread = min(std, iqr / 1.34) if iqr > 0 else std
    return 0.9 * spread * n ** (-0.2)


def kde_quantile(risks: Tensor, alpha: float, bandwidth: float | None = None, iters: int = 100) -> Tensor:
    """alpha-quantile of the Gaussian KDE of ``risks`` (1-D), differentiable w.r.t. the risks."""
    r = risks.detach().to(device="cpu", dtype=torch.float64)  # a handful of numbers: solve on the host
    h = silverman_bandwidth(r) if bandwidth is None else float(bandwidth)
    if r.numel() == 1 or h <= 0.0:
        return empirical_quantile(risks, alpha)
    normal = torch.distributions.Normal(0.0, 1.0)
    lo, hi = float(r.min()) - 10.0 * h, float(r.max()) + 10.0 * h
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if float(normal.cdf((mid - r) / h).mean()) < alpha:
            lo = mid
        else:
            hi = mid
    q = 0.5 * (lo + hi)
    dens = torch.exp(normal.log_prob((q - r) / h))
    w = (dens / dens.sum()).to(device=risks.device, dtype=risks.dtype)
    return torch.as_tensor(q, dtype=risks.dtype, device=risks.device) + (w * (risks - risks.detach())).sum()


def empirical_quantile(risks: Tensor, alpha: float) -> Tensor:
    """The linearly interpolated empirical alpha-quantile (``torch.quantile``), differentiable."""
    x = risks if risks.dtype in (torch.float32, torch.float64) else risks.float()
    return torch.quantile(x, alpha).to(risks.dtype)


@DOMAIN_METHODS.register("eqrm")
class EQRM(DomainMethod):
    """EQRM; options ``alpha`` (quantile, 0.75), ``kde`` (True), ``bandwidth`` (None: Silverman),
    ``burnin`` (ERM steps, 0), ``reduction`` ("mean" / "sum")."""

    def __init__(self, num_tasks: int, feature_dim: int | None = None, alpha: float = 0.75, kde: bool = True,
                 bandwidth: float | None = None, burnin: int = 0, reduction: str = "mean",
                 **options: Any) -> None:
        super().__init__(num_tasks, feature_dim, **options)
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"eqrm: alpha must be in (0, 1), got {alpha}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"eqrm: unknown reduction {reduction!r}; accepted: 'mean', 'sum'")
        if bandwidth is not None and (not math.isfinite(bandwidth) or bandwidth <= 0):
            raise ValueError(f"eqrm: bandwidth must be > 0, got {bandwidth}")
        self.alpha, self.kde, self.bandwidth = float(alpha), bool(kde), bandwidth
        self.burnin, self.reduction = int(burnin), reduction
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def objective(self, risks: Tensor) -> Tensor:
        """Mean risk during the burn-in, then the alpha-quantile of the risks (before ``reduction``)."""
        if int(self.steps) < self.burnin:
            return risks.mean()
        if self.kde:
            return kde_quantile(risks, self.alpha, self.bandwidth)
        return empirical_quantile(risks, self.alpha)

    def combine(self, losses: dict[int, Tensor], ctx: StepContext) -> Tensor:
        risks = torch.stack(list(losses.values()))
        value = self.objective(risks)
        self.steps += 1
        self.last_logs["eqrm_objective"] = float(value.detach())
        return value * risks.numel() if self.reduction == "sum" else value


__all__ = ["EQRM", "empirical_quantile", "kde_quantile", "silverman_bandwidth"]
