"""Loss-weighting, gradient and domain-generalisation methods, each registered by a plain name.

Importing this package imports every method module, so the registries are complete. Factories:
``get_weighting(name, num_tasks, **options)`` (weighting and gradient methods) and
``get_domain_method(name, num_tasks, feature_dim=None, **options)``; unknown names raise the registry's
ValueError listing the valid ones.
"""

from __future__ import annotations

from typing import Any

from mola.methods import domain, gradient, weighting
from mola.methods.base import DOMAIN_METHODS, WEIGHTINGS, Method, StepContext
from mola.methods.domain import DomainMethod
from mola.methods.gradient import GradientMethod


def get_weighting(name: str, num_tasks: int, **options: Any) -> Method:
    """A loss-weighting or gradient method by registered name (``ew``, ``pcgrad``, ...)."""
    return WEIGHTINGS.get(name)(num_tasks, **options)


def get_domain_method(name: str, num_tasks: int, feature_dim: int | None = None, **options: Any) -> Method:
    """A domain method by registered name (``dann``, ``eqrm``, ...); ``feature_dim``: flattened feature size."""
    return DOMAIN_METHODS.get(name)(num_tasks, feature_dim=feature_dim, **options)


__all__ = ["DOMAIN_METHODS", "WEIGHTINGS", "DomainMethod", "GradientMethod", "Method", "StepContext", "domain",
           "get_domain_method", "get_weighting", "gradient", "weighting"]
