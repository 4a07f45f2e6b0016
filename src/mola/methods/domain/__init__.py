"""Domain-generalisation methods, one file each, registered in DOMAIN_METHODS (``--method dann``); importing this
package imports every module in it (module discovery, ``mola.registry.import_plugins``)."""

from mola.methods.domain.base import DomainMethod
from mola.registry import import_plugins

import_plugins(__name__)

__all__ = ["DomainMethod"]
