"""EW: equal weighting, the plain sum of the present tasks' mean losses (docs/methods/weighting.md); the default."""

from __future__ import annotations

from mola.methods.base import WEIGHTINGS, Method


@WEIGHTINGS.register("ew")
class EW(Method):
    """L = sum_t L_t over the tasks present in the batch (the base Method's behaviour, under a name)."""


__all__ = ["EW"]
