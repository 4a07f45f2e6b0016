"""MoLAConfig (what to wrap, rank, alpha, mode, router and TwD settings), its value checks, and the
adapter-size budget checked before anything is allocated."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, cast

from torch import Tensor, nn

from mola.config_utils import from_dict
from mola.inject.targets import rank_for


@dataclass
class MoLAConfig:
    """Where MoLA goes and how it mixes: the single source of MoLA defaults (docs/concepts.md, docs/paper.md)."""

    mode: Literal["grad", "router"] = "grad"  # grad: task id picks the adapter; router: a router mixes them per input
    num_experts: int = 0  # E adapters per layer; 0 in a run config: the number of tasks (inject needs >= 1)
    rank: int | dict[str, int] = 4  # adapter rank r, or {module pattern: r} with a "*" default
    alpha: float = 16.0  # LoRA scaling s = alpha / rank
    layout: Literal["kernel", "factorized"] = "kernel"  # kernel: the paper's conv adapters; factorized: peft-style
    compute: Literal["auto", "merged", "lowrank", "reference"] = "auto"  # how task-id routing is computed (same result)
    target_modules: str | list[str] = "last_stage"  # last_stage, all_stages, "stages:1,3" or module names / "re:..."
    router_type: Literal["auto", "resnet", "mlp"] = "auto"  # auto: residual net if the model has a Conv2d, else MLP
    #: resize the router's copy of the input to this side; auto: to 32 px only when the input is larger (the
    #: side the CIFAR-style router was built for; cheap next to the backbone); null: as is
    router_input_size: int | Literal["auto"] | None = "auto"
    router_width: int = 16  # width w of the residual router (its stages have w, 2w, 4w channels)
    router_blocks: int = 3  # basic blocks per stage of the residual router
    #: stride of the residual router's stem conv: 2 (default) lets its blocks work at half the resolution, which
    #: makes the router ~0.1x a ResNet-18 step at 64 px (1: the paper's router, ~4x the cost)
    router_stem_stride: int = 2
    #: one router (and lift) for all MoLA layers, one per backbone stage holding MoLA layers, or one per MoLA
    #: layer (router mode; TwD is the mean over routers)
    router_sharing: Literal["shared", "per_stage", "per_layer"] = "shared"
    router_in_channels: int | None = None  # router input channels / features (null: read from the model)
    lift_dim: int = 32  # dimension d of the TwD code z
    lift_input: Literal["logits", "weights"] = "logits"  # the lift reads the router logits or softmax weights
    lift_hidden: int | None = None  # hidden width of a 2-layer MLP lift (null: one Linear)
    twd_weight: float = 0.1  # lambda: weight of the TwD loss (router mode)
    twd_tau: float = 1.0  # temperature tau of the TwD loss
    #: grad mode: the adapter of each task, e.g. [0, 0, 1, 2] (tasks 0 and 1 share adapter 0; E may then be < T);
    #: null: task t uses adapter t (E = T)
    task_to_expert: list[int] | None = None

    def __post_init__(self) -> None:
        checks = {"mode": ("grad", "router"), "layout": ("kernel", "factorized"),
                  "compute": ("auto", "merged", "lowrank", "reference"),
                  "router_type": ("auto", "resnet", "mlp"), "lift_input": ("logits", "weights"),
                  "router_sharing": ("shared", "per_stage", "per_layer"), "router_stem_stride": (1, 2)}
        for key, allowed in checks.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"MoLAConfig.{key}={getattr(self, key)!r}; expected one of {list(allowed)}")
        check_mola_values(self)  # numbers, router_input_size included
        for key in ("router_width", "router_blocks"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MoLAConfig.{key}={value!r}; expected a positive int")
        t2e = self.task_to_expert
        if t2e is not None:
            if self.mode != "grad":
                raise ValueError("MoLAConfig.task_to_expert maps tasks to adapters in grad mode; router mode mixes "
                                 "all adapters per input (set mode='grad' or drop task_to_expert)")
            if (not isinstance(t2e, (list, tuple)) or not t2e
                    or any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in t2e)):
                raise ValueError(f"MoLAConfig.task_to_expert={t2e!r}; expected a non-empty list of adapter "
                                 "indices >= 0")
            if self.num_experts and max(t2e) >= self.num_experts:
                raise ValueError(f"MoLAConfig.task_to_expert={list(t2e)} names adapter {max(t2e)} but num_experts="
                                 f"{self.num_experts} (adapters 0..{self.num_experts - 1})")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoLAConfig:
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RankTooLargeError(ValueError):
    """A MoLA rank above what the targeted layer can use (its weight's rank as a matrix)."""


def check_mola_values(cfg: MoLAConfig) -> None:
    """Range checks of a MoLAConfig's numbers (NaN/inf, <= 0): a ValueError naming the field and value."""

    def bad(key: str, value: Any, want: str) -> ValueError:
        return ValueError(f"MoLAConfig.{key}={value!r}; expected {want}")

    def number(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(key, value, "a finite number")
        return float(value)

    def integer(key: str, value: Any, low: int, optional: bool = False) -> None:
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise bad(key, value, f"an integer >= {low}" + (" or None" if optional else ""))

    integer("num_experts", cfg.num_experts, 0)
    ranks = cfg.rank.items() if isinstance(cfg.rank, dict) else [("", cfg.rank)]
    for pat, r in ranks:
        integer(f"rank[{pat!r}]" if pat else "rank", r, 1)
    if number("alpha", cfg.alpha) <= 0:
        raise bad("alpha", cfg.alpha, "a number > 0 (scaling s = alpha / rank)")
    if number("twd_weight", cfg.twd_weight) < 0:
        raise bad("twd_weight", cfg.twd_weight, "a number >= 0")
    if number("twd_tau", cfg.twd_tau) <= 0:
        raise bad("twd_tau", cfg.twd_tau, "a number > 0")
    integer("lift_dim", cfg.lift_dim, 1)
    integer("lift_hidden", cfg.lift_hidden, 1, optional=True)
    if cfg.router_input_size != "auto":
        integer("router_input_size", cfg.router_input_size, 1, optional=True)
    integer("router_in_channels", cfg.router_in_channels, 1, optional=True)


MAX_ADAPTER_GB = 8.0
"""Default limit of ``inject(..., max_adapter_gb=)``: adapters estimated above it are refused before allocation."""
ADAPTER_WARN_FACTOR = 10.0
"""``inject`` warns when the adapters hold more than this many times the wrapped model's parameters."""


def adapter_budget(model: nn.Module, names: list[str], config: MoLAConfig) -> int:
    """Adapter parameters ``inject`` would create for ``names``; a ValueError for a rank above what a layer can
    use (min(fan-out, fan-in): the rank of the layer's weight as a matrix; more only wastes memory)."""
    total = 0
    e = config.num_experts
    for n in names:
        base = model.get_submodule(n)
        r = rank_for(n, config.rank)
        shape = tuple(int(d) for d in cast(Tensor, base.weight).shape)
        if isinstance(base, nn.Conv2d):
            co, ci_g, kh, kw = shape
            usable = min(co, ci_g * kh * kw)
            if config.layout == "kernel":  # dW = B A: (co*kh, r*kh) x (r*kh, ci_g*kw)
                size = e * (r * kh * ci_g * kw + co * kh * r * kh)
            else:  # (co, r) x (r, ci_g*kh*kw)
                size = e * r * (ci_g * kh * kw + co)
        else:
            co, ci = shape
            usable, size = min(co, ci), e * r * (ci + co)
        if r > usable:
            raise RankTooLargeError(f"MoLA rank {r} for layer {n!r} ({type(base).__name__} weight {shape}, layout "
                                    f"{config.layout}) exceeds the largest rank its adapter can have ({usable}); "
                                    f"use rank <= {usable} (a dict rank sets it per layer)")
        total += size
    return total

