"""Parameter counts by part and against the adapter rank (paper Fig. 5), with closed forms for MoLA adapters."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from mola.inject import RankTooLargeError
from mola.models.base import num_parameters

RANKS: tuple[int, ...] = (1, 4, 8, 16, 64)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Counts by part (backbone, adapters, router, lift, heads, ... and total) via ``mola.models.num_parameters``."""
    return {k: int(v) for k, v in num_parameters(model).items()}


def adapter_count(layer: nn.Module, num_experts: int, rank: int, layout: str = "kernel") -> int:
    """Closed-form adapter parameters MoLA adds to one plain Conv2d/Linear (docs/concepts.md).

    Linear: E*r*(Ci+Co). Conv kernel layout: E*r*kh*(Ci/g*kw + Co*kh) (= E*r*k^2*(Ci+Co) for square kernels,
    g=1). Conv factorized layout: E*r*(Ci*kh*kw + Co).
    """
    e, r = num_experts, rank
    if isinstance(layer, nn.Linear):
        return e * r * (layer.in_features + layer.out_features)
    if isinstance(layer, nn.Conv2d):
        co, ci_g, kh, kw = layer.weight.shape
        if layout == "kernel":
            return e * r * kh * (ci_g * kw + co * kh)
        if layout == "factorized":
            return e * r * (ci_g * kh * kw + co)
        raise ValueError(f"unknown layout {layout!r}; expected 'kernel' or 'factorized'")
    raise ValueError(f"MoLA wraps only nn.Conv2d and nn.Linear, got {type(layer).__name__}")


def expected_adapter_count(model: nn.Module, names: Iterable[str], num_experts: int, rank: int,
                           layout: str = "kernel") -> int:
    """Sum of ``adapter_count`` over the named plain layers of ``model`` (before injection)."""
    return sum(adapter_count(model.get_submodule(n), num_experts, rank, layout) for n in names)


def single_task_total(counts: dict[str, int], num_tasks: int, shared_head: bool = False) -> int:
    """T separate networks: T*(backbone + head); ``counts`` from a multi-task model with per-task heads."""
    backbone = counts.get("backbone", counts.get("towers", 0))
    heads = counts.get("heads", 0)
    return num_tasks * (backbone + heads) if shared_head else num_tasks * backbone + heads


def count_vs_rank(build_fn: Callable[[int], nn.Module], ranks: Iterable[int] = RANKS) -> list[dict[str, Any]]:
    """One row per rank r: parameter counts by part of ``build_fn(r)`` (a fresh model with MoLA rank r); ranks
    above what the model's layers can use (``RankTooLargeError``) have no row."""
    rows = []
    for r in ranks:
        try:
            model = build_fn(int(r))
        except RankTooLargeError:
            continue
        rows.append({"rank": int(r), **parameter_counts(model)})
    return rows


__all__ = ["RANKS", "adapter_count", "count_vs_rank", "expected_adapter_count", "parameter_counts",
           "single_task_total"]
