"""GradDrop (Chen et al. 2020, "Just Pick a Sign: ... Gradient Sign Dropout"), on the shared representation.

At every element of the representation, the positive sign purity P = (1 + sum_t g_t / sum_t |g_t|) / 2 is the
probability of keeping the positive gradients; with U ~ Uniform(0, 1) per element, task t keeps its gradient
where (P > U and g_t > 0) or (P < U and g_t < 0). The direction is sum_t (l_t + (1 - l_t) M_t) g_t (leak l_t,
default 0). It needs the gradient w.r.t. the representation (``needs = "rep_grads"``): the masked direction is
then back-propagated through the encoder. "Batch-separated" gradients (each sample's rows only get its own
task's gradient, as in multi-input data) would never conflict element-wise, so by default (``batch_sum``)
purity and signs are computed from the gradients summed over the batch dimension, as the paper prescribes,
and each mask is shared by all rows of the batch. f(P) is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mola.methods.base import WEIGHTINGS, StepContext
from mola.methods.gradient.base import GradientMethod


def aggregate(G: Tensor, leak: float | Sequence[float] | Tensor = 0.0, generator: torch.Generator | None = None,
              u: Tensor | None = None, batch_size: int | None = None) -> Tensor:
    """GradDrop direction of the rows of G (T x D).

    ``u``: the uniform draws (shape D, or D / batch_size) instead of sampling them with ``generator``;
    ``batch_size``: rows of G are (batch_size x F) representation gradients; purity and signs use their
    sum over the batch and the masks are broadcast over it.
    """
    T, D = G.shape
    if batch_size:
        if D % batch_size:
            raise ValueError(f"graddrop: gradient length {D} is not a multiple of batch_size {batch_size}")
        signal = G.view(T, batch_size, D // batch_size).sum(dim=1)
    else:
        signal = G
    total, mass = signal.sum(dim=0), signal.abs().sum(dim=0)
    purity = torch.where(mass > 0, 0.5 * (1.0 + total / mass.clamp_min(torch.finfo(G.dtype).tiny)),
                         torch.full_like(total, 0.5))
    if u is None:
        u = torch.rand(purity.shape, generator=generator, dtype=G.dtype)
    u = u.to(device=G.device, dtype=G.dtype).reshape(purity.shape)
    keep = ((purity > u) & (signal > 0)) | ((purity < u) & (signal < 0))
    lk = torch.as_tensor(leak, dtype=G.dtype, device=G.device).reshape(-1)
    lk = lk.expand(T) if lk.numel() == 1 else lk
    if lk.numel() != T:
        raise ValueError(f"graddrop: leak has {lk.numel()} entries for {T} gradients")
    scale = lk.view(T, 1) + (1.0 - lk.view(T, 1)) * keep.to(G.dtype)
    if batch_size:
        scale = scale.unsqueeze(1).expand(T, batch_size, D // batch_size).reshape(T, D)
    return (scale * G).sum(dim=0)


@WEIGHTINGS.register("graddrop")
class GradDrop(GradientMethod):
    """GradDrop on the representation gradients; options ``leak`` (scalar or per task), ``batch_sum``, ``seed``."""

    needs = "rep_grads"

    def __init__(self, num_tasks: int, leak: float | Sequence[float] = 0.0, batch_sum: bool = True,
                 seed: int | None = None, **options: Any) -> None:
        super().__init__(num_tasks, **options)
        leaks = [float(leak)] * num_tasks if isinstance(leak, (int, float)) else [float(x) for x in leak]
        if len(leaks) != num_tasks or not all(0.0 <= x <= 1.0 for x in leaks):
            raise ValueError(f"graddrop: leak must be one value or {num_tasks} values in [0, 1], got {leak}")
        self.leaks = leaks
        self.batch_sum = batch_sum
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self._batch_size: int | None = None

    def backward(self, losses: dict[int, Tensor], ctx: StepContext) -> dict[str, Tensor | float]:
        feats = ctx.features
        self._batch_size = int(feats.shape[0]) if (self.batch_sum and feats is not None and feats.dim() > 1) else None
        if self._batch_size is not None and ctx.dist is not None:  # DDP: G holds the rows of the global batch
            self._batch_size = sum(ctx.dist.row_counts(self._batch_size))
        return super().backward(losses, ctx)

    def direction(self, G: Tensor, tasks: list[int], losses: list[Tensor]) -> Tensor:
        return aggregate(G, leak=[self.leaks[t] for t in tasks], generator=self.generator,
                         batch_size=self._batch_size)


__all__ = ["GradDrop", "aggregate"]
