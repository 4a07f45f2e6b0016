"""Gradient-manipulation methods; each module exposes ``aggregate(G, **options) -> direction`` and registers
its Method class in WEIGHTINGS (``--weighting pcgrad``)."""

from mola.methods.gradient import (
    aligned_mtl,
    cagrad,
    graddrop,
    gradvac,
    imtl,
    mgda,
    moco,
    nash_mtl,
    pcgrad,
)
from mola.methods.gradient.base import GradientMethod

__all__ = ["GradientMethod", "aligned_mtl", "cagrad", "graddrop", "gradvac", "imtl", "mgda", "moco", "nash_mtl",
           "pcgrad"]
