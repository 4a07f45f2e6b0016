"""Loss-weighting methods (they only rescale the per-task losses), one file each, registered in WEIGHTINGS;
importing this package imports every module in it (module discovery, ``mola.registry.import_plugins``)."""

from mola.registry import import_plugins

import_plugins(__name__)
