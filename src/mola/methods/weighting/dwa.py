"""DWA (Liu et al. 2019, MTAN paper): weights from the rate of change of each task's epoch-mean loss."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mola.methods.base import WEIGHTINGS, Method, StepContext


@WEIGHTINGS.register("dwa")
class DWA(Method):
    """w_t = T softmax_t(r_t / temperature), r_t = L_t(e-1) / L_t(e-2) (epoch means); equal weights (all 1) until
    two epochs have ended. Weights sum to T. A task missing from an epoch's means gets r_t = 1. The last two
    epochs' means live in a buffer, so a resumed run continues with the same weights."""

    def __init__(self, num_tasks: int, temperature: float = 2.0, **options: Any) -> None:
        super().__init__(num_tasks, **options)
        if temperature <= 0:
            raise ValueError(f"dwa: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.register_buffer("history", torch.full((2, num_tasks), math.nan, dtype=torch.float64))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))

    def weights(self) -> Tensor:
        """The current weight vector (length T, float64, sums to T)."""
        ratio = self.history[1] / self.history[0]
        ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
        w = self.num_tasks * torch.softmax(ratio / self.temperature, dim=0)
        return torch.where(self.epochs_seen < 2, torch.ones_like(w), w)  # no host sync: stays on the device

    def combine(self, losses: dict[int, Tensor], ctx: StepContext) -> Tensor:
        w = self.weights()
        return torch.stack([w[t].to(loss) * loss for t, loss in losses.items()]).sum()

    def on_epoch_end(self, epoch: int, mean_losses: dict[int, float]) -> None:
        """Shift the history and record this epoch's mean losses."""
        self.history[0] = self.history[1]
        self.history[1] = torch.tensor([mean_losses.get(t, math.nan) for t in range(self.num_tasks)],
                                       dtype=torch.float64)
        self.epochs_seen += 1

    def backward(self, losses: dict[int, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        super().backward(losses, ctx)
        w = self.weights()
        return {f"w{t}": w[t] for t in losses}


__all__ = ["DWA"]
