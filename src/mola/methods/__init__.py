"""Loss-weighting, gradient and domain-generalisation methods, each registered by a plain name."""

from mola.methods.base import DOMAIN_METHODS, WEIGHTINGS, Method, StepContext

__all__ = ["DOMAIN_METHODS", "WEIGHTINGS", "Method", "StepContext"]
