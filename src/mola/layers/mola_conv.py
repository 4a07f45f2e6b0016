"""MoLAConv2d: an ``nn.Conv2d`` with E low-rank adapters in the kernel or factorized layout (docs/concepts.md)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mola.layers.adapter import MoLALayer


class MoLAConv2d(MoLALayer):
    """Wraps an existing Conv2d (keeping weight, bias, stride, padding, dilation, groups) with E adapters.

    ``layout="kernel"``: A_e (r*kh, (Ci/g)*kw), B_e (Co*kh, r*kh), dW_e = view(B_e @ A_e, W0.shape).
    ``layout="factorized"``: A_e a conv Ci -> r with the base kernel, B_e a 1x1 conv r -> Co (groups must be 1).
    All A_e are stored stacked as one 4-D conv weight ``lora_A`` (E*r, Ci, kh, kw) (rows e*r .. e*r+r-1 are
    A_e, peft's per-task lora_A conv layout), so ``model.to(memory_format=torch.channels_last)`` works;
    ``lora_B`` is (E, Co, r).
    """

    base_layer: nn.Conv2d

    def __init__(
        self,
        base: nn.Conv2d,
        num_experts: int,
        rank: int,
        alpha: float = 16.0,
        layout: str = "kernel",
        compute: str = "auto",
        name: str = "conv",
    ) -> None:
        if not isinstance(base, nn.Conv2d):
            raise ValueError(f"MoLAConv2d wraps nn.Conv2d; {name!r} is {type(base).__name__}")
        super().__init__(base, num_experts, rank, alpha, layout, compute, name)
        co, ci_g, kh, kw = base.weight.shape
        g = base.groups
        if layout == "factorized" and g > 1:
            raise ValueError(
                f"MoLA layer {name!r}: the factorized layout does not support grouped convolutions "
                f"(groups={g}); use layout='kernel'"
            )
        e, r = num_experts, rank
        dev, dt = base.weight.device, base.weight.dtype
        if layout == "kernel":
            self.lora_A = nn.Parameter(torch.empty(e, r * kh, ci_g * kw, device=dev, dtype=dt))
            self.lora_B = nn.Parameter(torch.zeros(e, co * kh, r * kh, device=dev, dtype=dt))
        else:
            self.lora_A = nn.Parameter(torch.empty(e * r, ci_g, kh, kw, device=dev, dtype=dt))
            self.lora_B = nn.Parameter(torch.zeros(e, co, r, device=dev, dtype=dt))
        self.reset_adapters()

    def expert_A(self) -> Tensor:
        """A per expert as (E, r*kh, (Ci/g)*kw) (kernel) or (E, r, Ci*kh*kw) (factorized; a copy if channels_last)."""
        if self.layout == "kernel":
            return self.lora_A
        return self.lora_A.reshape(self.num_experts, self.rank, -1)

    def reset_adapters(self) -> None:
        """A kaiming-uniform(a=sqrt 5) per expert (fan-in of one A_e), B = 0."""
        if self.layout == "kernel":
            super().reset_adapters()
            return
        with torch.no_grad():
            for a in self.lora_A.view(self.num_experts, self.rank, *self.lora_A.shape[1:]):
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_B.zero_()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # Factorized lora_A saved before the 4-D storage was (E, r, Ci, kh, kw): the same numbers, reshaped.
        key = prefix + "lora_A"
        old = state_dict.get(key)
        if self.layout == "factorized" and isinstance(old, Tensor) and old.dim() == 5:
            state_dict[key] = old.reshape(self.lora_A.shape) if old.numel() == self.lora_A.numel() else old
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _factors(self, experts: Tensor) -> tuple[Tensor, Tensor]:
        return self.lora_B.index_select(0, experts), self.expert_A().index_select(0, experts)

    def lowrank_cost_ratio(self) -> float:
        co, ci_g, kh, kw = self.weight.shape
        g, e, r = self.base_layer.groups, self.num_experts, self.rank
        base = co * ci_g * kh * kw
        if self.layout == "factorized":
            extra = e * r * ci_g * kh * kw + co * e * r
        elif ci_g % kh == 0:  # A: g*kh*E*r*kh outputs reading Ci/(g*kh)*kh*kw inputs; B: 1x1 back to Co
            extra = g * e * r * kh * ci_g * kh * kw + co * kh * e * r * kh
        else:  # block-diagonal A: g*E*kh*r*kh outputs reading Ci/g*kh*kw inputs
            extra = g * e * r * kh * kh * ci_g * kh * kw + co * e * kh * r * kh
        return extra / base

    def merge_cost_ratio(self) -> float:
        # kernel layout: B (Co*kh x r*kh) @ A (r*kh x Ci/g*kw) is r*kh MACs per weight entry; factorized: r
        return float(self.rank * (self.weight.shape[2] if self.layout == "kernel" else 1))

    def output_positions(self, x: Tensor) -> int:
        conv = self.base_layer
        if conv.padding == "same":
            return x.shape[0] * x.shape[-2] * x.shape[-1]
        pads: tuple[int, ...] = (0, 0) if isinstance(conv.padding, str) else tuple(conv.padding)
        sizes = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                 zip(x.shape[-2:], pads, conv.dilation, conv.kernel_size, conv.stride, strict=True)]
        return max(1, x.shape[0] * max(sizes[0], 1) * max(sizes[1], 1))

    def delta_weights(self, experts: Tensor | None = None) -> Tensor:
        a, b = self.expert_A(), self.lora_B
        if experts is not None:
            a, b = a.index_select(0, experts), b.index_select(0, experts)
        return torch.bmm(b, a).view(a.shape[0], *self.weight.shape)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int, padded: bool = False) -> Tensor:
        c = self.base_layer
        if c.padding_mode != "zeros" and not padded:
            x = F.pad(x, c._reversed_padding_repeated_twice, mode=c.padding_mode)
            return F.conv2d(x, weight, bias, c.stride, 0, c.dilation, groups)
        return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, groups)

    def _op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._conv(x, weight, bias, self.base_layer.groups)

    def _dense_delta(self, x: Tensor, w: Tensor) -> Tensor:
        """sum_e w_b,e conv(x_b, dW_e) as one low-rank conv, a per-sample scale and one 1x1 conv."""
        bsz = x.shape[0]
        e, r = self.num_experts, self.rank
        co, ci_g, kh, kw = self.weight.shape
        g = self.base_layer.groups
        if self.layout == "factorized":
            z = self._conv(x, self.lora_A, None, 1)
            z = (z.view(bsz, e, r, *z.shape[2:]) * w.to(z.dtype).view(bsz, e, 1, 1, 1)).flatten(1, 2)
            b_all = self.lora_B.permute(1, 0, 2).reshape(co, e * r, 1, 1)
            return F.conv2d(z, b_all)
        rk = r * kh
        if ci_g % kh == 0:
            # Column block a of the reshaped B@A reads input channels [a*Ci/(g*kh), (a+1)*Ci/(g*kh)) only,
            # so the A step is a grouped conv with g*kh groups and no wasted (zero) weights.
            a_grp = self.lora_A.reshape(e * rk, ci_g // kh, kh, kw)
            z = self._conv(x, a_grp.repeat(g * kh, 1, 1, 1), None, g * kh)
            z = z.view(bsz, g, kh, e, rk, *z.shape[2:]) * w.to(z.dtype).view(bsz, 1, 1, e, 1, 1, 1)
            b_all = self.lora_B.view(e, co, kh, rk).permute(1, 2, 0, 3).reshape(co, kh * e * rk, 1, 1)
        else:
            # General case: A placed block-diagonally (zeros elsewhere) in a (kh*rk, Ci/g, kh, kw) kernel.
            eye = torch.eye(kh, device=x.device, dtype=self.lora_A.dtype)
            a_big = torch.einsum("ab,emc->eambc", eye, self.lora_A).reshape(e * kh * rk, ci_g, kh, kw)
            z = self._conv(x, a_big.repeat(g, 1, 1, 1), None, g)
            z = z.view(bsz, g, e, kh, rk, *z.shape[2:]) * w.to(z.dtype).view(bsz, 1, e, 1, 1, 1, 1)
            b_all = self.lora_B.view(e, co, kh, rk).permute(1, 0, 2, 3).reshape(co, e * kh * rk, 1, 1)
        return F.conv2d(z.flatten(1, 4), b_all, None, 1, 0, 1, g)
