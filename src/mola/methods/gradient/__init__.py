"""Gradient-manipulation methods; each module exposes ``aggregate(G, **options) -> direction`` and registers
its Method class in WEIGHTINGS (``--weighting pcgrad``); importing this package imports every module in it
(module discovery, ``mola.registry.import_plugins``)."""

from mola.methods.gradient.base import GradientMethod
from mola.registry import import_plugins

import_plugins(__name__)

__all__ = ["GradientMethod"]
