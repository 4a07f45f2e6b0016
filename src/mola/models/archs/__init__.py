"""Baseline architectures and MoLA, one file each, registered in ``mola.models.base.ARCHS``; importing this
package imports every module in it (module discovery, ``mola.registry.import_plugins``)."""

from mola.registry import import_plugins

import_plugins(__name__)
