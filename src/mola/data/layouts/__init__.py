"""Built-in on-disk layouts, one module each; importing this package imports them all (module discovery,
``mola.registry.import_plugins``) and each registers its builders in ``mola.data.registry.SCENARIOS``."""

from mola.registry import import_plugins

import_plugins(__name__)
