"""Domain-generalisation methods (tasks are domains), registered in DOMAIN_METHODS (``--method dann``)."""

from mola.methods.domain import dann, eqrm, mmd_aae, selfreg
from mola.methods.domain.base import DomainMethod

__all__ = ["DomainMethod", "dann", "eqrm", "mmd_aae", "selfreg"]
