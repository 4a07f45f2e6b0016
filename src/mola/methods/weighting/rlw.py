"""RLW (Lin et al. 2022, "Reasonable Effectiveness of Random Weighting"): fresh random loss weights each step."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mola.methods.base import WEIGHTINGS, Method, StepContext


@WEIGHTINGS.register("rlw")
class RLW(Method):
    """Weights w = T * softmax(z), z ~ N(0, I_T), drawn every step (they sum to T, like ``ew``'s all-ones);
    the present tasks' losses are weighted by their entries. Option ``seed`` for a private generator."""

    def __init__(self, num_tasks: int, seed: int | None = None, **options: Any) -> None:
        super().__init__(num_tasks, **options)
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.last_weights: Tensor | None = None

    def sample_weights(self) -> Tensor:
        """A fresh weight vector of length T summing to T."""
        z = torch.randn(self.num_tasks, generator=self.generator, dtype=torch.float64)
        return self.num_tasks * torch.softmax(z, dim=0)

    def combine(self, losses: dict[int, Tensor], ctx: StepContext) -> Tensor:
        w = self.sample_weights()
        if ctx.dist is not None:  # DDP: every rank weights the tasks with rank 0's draw
            ctx.dist.broadcast_(w)
        self.last_weights = w
        return torch.stack([w[t].to(loss) * loss for t, loss in losses.items()]).sum()

    def backward(self, losses: dict[int, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        super().backward(losses, ctx)
        assert self.last_weights is not None
        return {f"w{t}": self.last_weights[t] for t in losses}


__all__ = ["RLW"]
