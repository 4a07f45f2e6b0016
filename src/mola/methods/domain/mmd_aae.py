"""MMD-AAE (Li et al. 2018, "Domain Generalization with Adversarial Feature Learning"), on the shared features.

Regulariser 1 (exact): the mean over pairs of present domains (i < j) of the biased (V-statistic) estimate
    MMD^2(X, Y) = mean k(X, X) + mean k(Y, Y) - 2 mean k(X, Y),
with k the MIXTURE (mean) of Gaussian kernels exp(-||x - y||^2 / (2 s^2)) over the ``bandwidths`` s, computed on
the flattened ``ctx.features``. Regulariser 2 (optional, ``adv_weight`` > 0, off by default): the adversarial
autoencoder prior — a discriminator tells Laplace(0, 1) samples from the features; the features are trained
through a gradient-reversal layer to fool it. Simplification: the paper's own encoder/decoder and its
reconstruction loss are omitted — the backbone is the encoder and ``ctx.features`` its code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mola.methods.base import DOMAIN_METHODS, StepContext
from mola.methods.domain.base import DomainMethod, flat_features, plain_sum
from mola.methods.domain.dann import grad_reverse, mlp


def gaussian_kernel(x: Tensor, y: Tensor, bandwidths: Sequence[float]) -> Tensor:
    """Mean over bandwidths s of exp(-||x_i - y_j||^2 / (2 s^2)), an (n x m) matrix."""
    d2 = ((x * x).sum(1, keepdim=True) + (y * y).sum(1).unsqueeze(0) - 2.0 * x @ y.T).clamp_min(0.0)
    return torch.stack([torch.exp(-d2 / (2.0 * s * s)) for s in bandwidths]).mean(0)


def mmd2(x: Tensor, y: Tensor, bandwidths: Sequence[float]) -> Tensor:
    """Biased estimate of the squared MMD between the rows of x and the rows of y."""
    return (gaussian_kernel(x, x, bandwidths).mean() + gaussian_kernel(y, y, bandwidths).mean()
            - 2.0 * gaussian_kernel(x, y, bandwidths).mean())


def pairwise_mmd(feats: Tensor, domains: Tensor, bandwidths: Sequence[float]) -> Tensor:
    """Mean of MMD^2 over the pairs of domains present in the batch (0 with fewer than two)."""
    present = torch.unique(domains).tolist()
    groups = [feats[domains == d] for d in present]
    terms = [mmd2(groups[i], groups[j], bandwidths) for i in range(len(groups)) for j in range(i + 1, len(groups))]
    return torch.stack(terms).mean() if terms else feats.sum() * 0.0


@DOMAIN_METHODS.register("mmd_aae")
class MMDAAE(DomainMethod):
    """MMD-AAE; options ``bandwidths`` (kernel widths s), ``mmd_weight`` (1.0), ``adv_weight`` (0.0: off),
    ``hidden`` (discriminator width, 256). ``feature_dim`` is needed only with the adversarial term."""

    def __init__(self, num_tasks: int, feature_dim: int | None = None,
                 bandwidths: Sequence[float] = (1.0, 2.0, 4.0, 8.0, 16.0), mmd_weight: float = 1.0,
                 adv_weight: float = 0.0, hidden: int = 256, **options: Any) -> None:
        super().__init__(num_tasks, feature_dim, **options)
        self.bandwidths = [float(s) for s in bandwidths]
        if not self.bandwidths or min(self.bandwidths) <= 0:
            raise ValueError(f"mmd_aae: bandwidths must be positive, got {bandwidths}")
        self.mmd_weight, self.adv_weight = float(mmd_weight), float(adv_weight)
        self.discriminator = mlp(self.require_feature_dim(), hidden, 1) if self.adv_weight > 0 else None

    def adversarial_loss(self, feats: Tensor) -> Tensor:
        """Discriminator BCE on prior samples (label 1) and gradient-reversed features (label 0)."""
        assert self.discriminator is not None
        dtype = next(self.discriminator.parameters()).dtype
        prior = torch.distributions.Laplace(0.0, 1.0).sample(feats.shape).to(device=feats.device, dtype=dtype)
        real = self.discriminator(prior)
        fake = self.discriminator(grad_reverse(feats).to(dtype))
        return (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))

    def combine(self, losses: dict[int, Tensor], ctx: StepContext) -> Tensor:
        feats = flat_features(ctx)
        if feats.dtype in (torch.float16, torch.bfloat16):
            feats = feats.float()
        reg = pairwise_mmd(feats, ctx.task_ids, self.bandwidths)
        self.last_logs["mmd"] = float(reg.detach())
        total = plain_sum(losses) + self.mmd_weight * reg
        if self.discriminator is not None:
            adv = self.adversarial_loss(feats)
            self.last_logs["adv"] = float(adv.detach())
            total = total + self.adv_weight * adv
        return total


__all__ = ["MMDAAE", "gaussian_kernel", "mmd2", "pairwise_mmd"]
