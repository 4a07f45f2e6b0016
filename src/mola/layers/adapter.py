"""Shared machinery of MoLA layers: adapter bookkeeping, routing checks and the three compute paths.

A subclass provides ``delta_weights`` (the exact dW_e of docs/concepts.md), ``_op`` (the wrapped op with a given
weight) and ``_dense_delta`` (the cheapest exact evaluation of sum_e w_b,e f(x_b; dW_e)).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from mola.layers.routing import Routing

Layout = Literal["kernel", "factorized"]
Compute = Literal["auto", "merged", "lowrank", "reference"]
LAYOUTS = ("kernel", "factorized")
COMPUTES = ("auto", "merged", "lowrank", "reference")
LOWRANK_MAX_RATIO = 1.0
"""With task ids, ``auto`` takes the low-rank path when its extra multiply-adds are at most this share of the
base op's, or when they stay below the cost of building one merged weight per expert (small feature maps), and
one merged weight per present task otherwise."""


class MoLALayer(nn.Module):
    """Base of MoLAConv2d / MoLALinear: y_b = f(x_b; W0 + s * sum_e w_b,e dW_e), s = alpha / rank."""

    base_layer: nn.Conv2d | nn.Linear
    lora_A: Tensor
    """Stacked A factors of all experts (an ``nn.Parameter`` set by the subclass)."""
    lora_B: Tensor
    """Stacked B factors of all experts, (E, ...) (an ``nn.Parameter`` set by the subclass)."""

    def __init__(
        self,
        base: nn.Conv2d | nn.Linear,
        num_experts: int,
        rank: int,
        alpha: float,
        layout: str,
        compute: str,
        name: str,
    ) -> None:
        super().__init__()
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"MoLA layer {name!r}: num_experts must be a positive int, got {num_experts!r}")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"MoLA layer {name!r}: rank must be a positive int, got {rank!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"MoLA layer {name!r}: unknown layout {layout!r}; expected one of {LAYOUTS}")
        if compute not in COMPUTES:
            raise ValueError(f"MoLA layer {name!r}: unknown compute {compute!r}; expected one of {COMPUTES}")
        self.base_layer = base
        self.num_experts = num_experts
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = float(alpha) / rank
        self.layout = layout
        self.compute = compute
        self.layer_name = name
        self.routing: Routing | None = None

    # -- subclass interface -------------------------------------------------------------------------
    def delta_weights(self, experts: Tensor | None = None) -> Tensor:
        """dW_e for the given experts (all if None), shaped (n, *W0.shape), without the scaling s."""
        raise NotImplementedError

    def _op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _dense_delta(self, x: Tensor, w: Tensor) -> Tensor:
        raise NotImplementedError

    def _factors(self, experts: Tensor) -> tuple[Tensor, Tensor]:
        """(B_e, A_e) of the given experts as matrices whose product, viewed as W0's shape, is dW_e."""
        raise NotImplementedError

    def lowrank_cost_ratio(self) -> float:
        """Multiply-adds of the low-rank path's extra work per output position over the base op's."""
        raise NotImplementedError

    def merge_cost_ratio(self) -> float:
        """Multiply-adds of building one merged weight W0 + s*dW_e, over the base op's per output position."""
        raise NotImplementedError

    def output_positions(self, x: Tensor) -> int:
        """Number of output positions (batch x spatial) the base op computes for input ``x``."""
        raise NotImplementedError

    @property
    def task_path(self) -> str:
        """How task-id routing is computed: "merged" (one weight per present task) or "lowrank" (one-hot mixing)."""
        return self.task_path_for(None)

    def task_path_for(self, x: Tensor | None) -> str:
        """The task-id path for input ``x``: low-rank when its extra work is at most the base op's, or (given x)
        at most the work of building E merged weights, which dominates on small feature maps and batches."""
        if self.compute in ("merged", "lowrank"):
            return self.compute
        ratio = self.lowrank_cost_ratio()
        if ratio <= LOWRANK_MAX_RATIO:
            return "lowrank"
        if x is not None and ratio * self.output_positions(x) <= self.num_experts * self.merge_cost_ratio():
            return "lowrank"
        return "merged"

    def reset_adapters(self) -> None:
        """A kaiming-uniform(a=sqrt 5) per expert, B = 0: a fresh layer computes exactly its base op."""
        with torch.no_grad():
            for a in self.lora_A:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_B.zero_()

    # -- helpers ------------------------------------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def merged_weights(self, experts: Tensor) -> Tensor:
        """W0 + s * dW_e for each given expert, (n, *W0.shape), in one fused batched multiply-add."""
        b, a = self._factors(experts)
        w0 = self.weight.reshape(1, b.shape[1], a.shape[2]).expand(b.shape[0], -1, -1)
        return torch.baddbmm(w0, b, a, alpha=self.scaling).view(b.shape[0], *self.weight.shape)

    def merged_weight(self, expert: int) -> Tensor:
        """W0 + s * dW_e: the weight a sample routed only to ``expert`` sees."""
        return self.merged_weights(torch.tensor([expert], device=self.weight.device))[0]

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, rank={self.rank}, alpha={self.alpha:g}, layout={self.layout}, "
            f"compute={self.compute}"
        )

    def _routing(self, x: Tensor) -> Routing:
        r = self.routing
        if r is None:
            raise RuntimeError(
                f"MoLA layer {self.layer_name!r} has no routing: wrap the model with mola.inject and call it"
            )
        if x.shape[0] != r.batch_size:
            raise ValueError(
                f"MoLA layer {self.layer_name!r} got a batch of {x.shape[0]} samples but the routing holds "
                f"{r.batch_size}; the model must keep the batch dimension first and intact"
            )
        return r

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        r = self._routing(x)
        if self.compute == "reference":
            return self._reference(x, r.mixing())
        if r.dense:
            assert r.weights is not None
            return self._op(x, self.weight, self.bias) + self.scaling * self._dense_delta(x, r.weights)
        if self.task_path_for(x) == "lowrank":
            # one-hot mixing through the low-rank path: exact, no host sync, other adapters get zero gradient
            return self._op(x, self.weight, self.bias) + self.scaling * self._dense_delta(x, r.mixing())
        return self._per_task(x, r)

    def _per_task(self, x: Tensor, r: Routing) -> Tensor:
        """One merged weight per task present in the batch, one op per task on its samples."""
        order, inverse, counts = r.groups()
        present = [e for e, c in enumerate(counts) if c > 0]
        if not present:  # empty batch: nothing to route, the base op gives the right (0, ...) shape
            return self._op(x, self.weight, self.bias)
        idx = torch.tensor(present, dtype=torch.long, device=self.weight.device)
        # unbind, not merged[i]: indexing would make autograd write a full-size zero gradient per task
        merged = self.merged_weights(idx).unbind(0)
        if len(present) == 1:
            return self._op(x, merged[0], self.bias)
        chunks = x.index_select(0, order).split(counts)
        outs = [self._op(chunks[e], merged[i], self.bias) for i, e in enumerate(present)]
        return torch.cat(outs).index_select(0, inverse)

    def _reference(self, x: Tensor, w: Tensor) -> Tensor:
        """Slow, obvious per-sample definition, kept as the oracle for tests."""
        dw = self.delta_weights().flatten(1)
        outs = []
        for b in range(x.shape[0]):
            wb = self.weight + self.scaling * (w[b].to(dw.dtype) @ dw).view_as(self.weight)
            outs.append(self._op(x[b : b + 1], wb, self.bias))
        return torch.cat(outs)
