"""SelfReg (Kim et al. 2021, "Self-supervised Contrastive Regularization for Domain Generalization"), simplified.

Only positive pairs: every sample i is paired with a random sample j(i) of the SAME CLASS in the batch (any
domain — batches mix domains, so most pairs cross domains; a sample alone in its class pairs with itself).
With z the flattened shared features, o the logits and p the class-specific domain perturbation layer (CDPL,
here z + MLP(z) with the MLP's last layer zero-initialised, so p starts as the identity):
    L_ind = mean_i ||p(z_i) - z_j(i)||^2                               (in-batch dissimilarity)
    L_hdl = mean_i ||p(z_i) - (gamma z_j(i) + (1 - gamma) z_k(i))||^2  (mixup of two same-class partners,
                                                                         gamma ~ Beta(0.5, 0.5) per batch)
and the same two terms on the logits without p. ||.||^2 is averaged over the feature (logit) dimension so
the weights do not depend on the width. Total = sum of domain losses + feature_weight * (L_ind + L_hdl)_z
+ logit_weight * (L_ind + L_hdl)_o. Simplifications: no SWA / curriculum, a fixed regulariser weight (no
schedule). Needs class-index targets; the logit terms are skipped when logits cannot be stacked.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mola.methods.base import DOMAIN_METHODS, StepContext
from mola.methods.domain.base import DomainMethod, batch_order, flat_features, plain_sum


def same_class_partners(labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """For each row, the index of a random row with the same label (a within-class permutation)."""
    partner = torch.arange(labels.shape[0], device=labels.device)
    for c in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == c).squeeze(1)
        perm = torch.randperm(rows.numel(), generator=generator).to(rows.device)
        partner[rows] = rows[perm]
    return partner


def dissimilarity(anchor: Tensor, z: Tensor, j: Tensor, k: Tensor, gamma: float) -> Tensor:
    """L_ind + L_hdl for anchors ``anchor`` (p(z) or z itself) and partner indices j, k."""
    ind = (anchor - z[j]).pow(2).mean()
    mixed = gamma * z[j] + (1.0 - gamma) * z[k]
    return ind + (anchor - mixed).pow(2).mean()


@DOMAIN_METHODS.register("selfreg")
class SelfReg(DomainMethod):
    """SelfReg; options ``feature_weight`` (1.0), ``logit_weight`` (1.0), ``cdpl`` (True; needs feature_dim),
    ``hidden`` (CDPL width, default feature_dim), ``mixup_alpha`` (0.5), ``seed``."""

    def __init__(self, num_tasks: int, feature_dim: int | None = None, feature_weight: float = 1.0,
                 logit_weight: float = 1.0, cdpl: bool = True, hidden: int | None = None,
                 mixup_alpha: float = 0.5, seed: int | None = None, **options: Any) -> None:
        super().__init__(num_tasks, feature_dim, **options)
        self.feature_weight, self.logit_weight = float(feature_weight), float(logit_weight)
        self.mixup_alpha = float(mixup_alpha)
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self._rng = None if seed is None else np.random.default_rng(seed)
        self.cdpl: nn.Module | None = None
        if cdpl:
            f = self.require_feature_dim()
            h = hidden or f
            self.cdpl = nn.Sequential(nn.Linear(f, h), nn.ReLU(), nn.Linear(h, f))
            nn.init.zeros_(self.cdpl[2].weight)
            nn.init.zeros_(self.cdpl[2].bias)

    def perturb(self, z: Tensor) -> Tensor:
        """CDPL: z + MLP(z) (identity when disabled or at initialisation)."""
        return z if self.cdpl is None else z + self.cdpl(z)

    def _gamma(self) -> float:
        """The batch's mixup coefficient gamma ~ Beta(mixup_alpha, mixup_alpha)."""
        if self._rng is not None:
            return float(self._rng.beta(self.mixup_alpha, self.mixup_alpha))
        a = torch.tensor(self.mixup_alpha, dtype=torch.float64)
        return float(torch.distributions.Beta(a, a).sample())

    def regulariser(self, ctx: StepContext) -> Tensor:
        """The SelfReg terms for this batch (0 when no class labels are available)."""
        feats = flat_features(ctx)
        labels = batch_order(ctx.targets, ctx.task_ids)
        if labels is None or labels.dim() != 1 or labels.dtype.is_floating_point:
            raise ValueError("selfreg needs class-index targets (one integer label per sample)")
        j = same_class_partners(labels, self.generator)
        k = same_class_partners(labels, self.generator)
        gamma = self._gamma()
        z = feats
        reg = self.feature_weight * dissimilarity(self.perturb(z), z, j, k, gamma)
        logits = batch_order(ctx.outputs, ctx.task_ids)
        if logits is not None and logits.shape[0] == z.shape[0] and self.logit_weight:
            o = logits.flatten(1)
            reg = reg + self.logit_weight * dissimilarity(o, o, j, k, gamma)
        return reg

    def combine(self, losses: dict[int, Tensor], ctx: StepContext) -> Tensor:
        reg = self.regulariser(ctx)
        self.last_logs["selfreg"] = float(reg.detach())
        return plain_sum(losses) + reg


__all__ = ["SelfReg", "dissimilarity", "same_class_partners"]
