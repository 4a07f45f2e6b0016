"""MoLALinear: an ``nn.Linear`` with E low-rank adapters (plain LoRA products; both layouts coincide)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mola.layers.adapter import MoLALayer


class MoLALinear(MoLALayer):
    """Wraps an existing Linear with E adapters A_e (r, Ci), B_e (Co, r); works on (B, ..., Ci) inputs."""

    base_layer: nn.Linear

    def __init__(
        self,
        base: nn.Linear,
        num_experts: int,
        rank: int,
        alpha: float = 16.0,
        layout: str = "kernel",
        compute: str = "auto",
        name: str = "linear",
    ) -> None:
        if not isinstance(base, nn.Linear):
            raise ValueError(f"MoLALinear wraps nn.Linear; {name!r} is {type(base).__name__}")
        super().__init__(base, num_experts, rank, alpha, layout, compute, name)
        co, ci = base.weight.shape
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, ci, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, co, rank, device=dev, dtype=dt))
        self.reset_adapters()


    def _factors(self, experts: Tensor) -> tuple[Tensor, Tensor]:
        return self.lora_B.index_select(0, experts), self.lora_A.index_select(0, experts)

    def lowrank_cost_ratio(self) -> float:
        co, ci = self.weight.shape
        return self.num_experts * self.rank * (ci + co) / (co * ci)

    def merge_cost_ratio(self) -> float:
        return float(self.rank)

    def output_positions(self, x: Tensor) -> int:
        return max(1, x.numel() // max(1, x.shape[-1]))

    def delta_weights(self, experts: Tensor | None = None) -> Tensor:
        a, b = self.lora_A, self.lora_B
        if experts is not None:
            a, b = a.index_select(0, experts), b.index_select(0, experts)
        return torch.bmm(b, a)

    def _op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def _dense_delta(self, x: Tensor, w: Tensor) -> Tensor:
        """sum_e w_b,e B_e A_e x_b via one (E*r)-wide projection, a per-sample scale and one projection."""
        e, r = self.num_experts, self.rank
        co = self.weight.shape[0]
        h = F.linear(x, self.lora_A.reshape(e * r, -1))
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (e, 1)
        h = (h.unflatten(-1, (e, r)) * w.to(h.dtype).view(shape)).flatten(-2)
        return F.linear(h, self.lora_B.permute(1, 0, 2).reshape(co, e * r))
