"""Paired comparison of two methods over seeds: mean difference, Student-t 95% interval, wins/losses, verdict.

Runs of two methods that share a seed share the data split and the initialisation seed, so their difference
removes most of the seed-to-seed noise; the interval is over the per-seed differences (n - 1 degrees of freedom).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

Verdict = str  # "better" | "worse" | "unresolved"
MIN_PAIRS = 3
"""Fewest paired seeds for a verdict other than "unresolved"."""


@dataclass(frozen=True)
class PairedResult:
    """``diff = method - reference`` per shared seed, signed so that positive is always "better"."""

    n: int
    mean: float
    low: float
    high: float
    wins: int
    losses: int
    ties: int
    verdict: Verdict
    seeds: tuple[int, ...]


def paired_difference(method: dict[int, float], reference: dict[int, float], higher_is_better: bool = True,
                      confidence: float = 0.95) -> PairedResult:
    """Pair ``seed -> value`` maps on their shared seeds (non-finite values dropped) and summarise the
    differences; with fewer than two pairs the interval is NaN, and with fewer than MIN_PAIRS the verdict is
    "unresolved" whatever the interval (two equal differences give a zero-width interval)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    seeds = tuple(sorted(s for s in method if s in reference
                         and math.isfinite(method[s]) and math.isfinite(reference[s])))
    sign = 1.0 if higher_is_better else -1.0
    d = np.array([sign * (method[s] - reference[s]) for s in seeds], dtype=np.float64)
    n = len(d)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    if n == 0:
        return PairedResult(0, math.nan, math.nan, math.nan, 0, 0, 0, "unresolved", seeds)
    mean = float(d.mean())
    if n < 2:
        return PairedResult(n, mean, math.nan, math.nan, wins, losses, n - wins - losses, "unresolved", seeds)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
    low, high = mean - half, mean + half
    verdict = "unresolved" if n < MIN_PAIRS else "better" if low > 0 else "worse" if high < 0 else "unresolved"
    return PairedResult(n, mean, low, high, wins, losses, n - wins - losses, verdict, seeds)


def by_seed(seeds: Sequence[int | None], values: Sequence[float], what: str) -> dict[int, float]:
    """``seed -> value``; a run without a seed or two runs with one seed is a ValueError naming ``what``."""
    out: dict[int, float] = {}
    for s, v in zip(seeds, values, strict=True):
        if s is None:
            raise ValueError(f"{what}: a run has no seed, so it cannot be paired")
        if s in out:
            raise ValueError(f"{what}: two runs with seed {s}; paired statistics need one run per seed")
        out[int(s)] = float(v)
    return out


__all__ = ["MIN_PAIRS", "PairedResult", "by_seed", "paired_difference"]
