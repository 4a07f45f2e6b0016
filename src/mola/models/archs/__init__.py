"""Baseline architectures and MoLA, one file each, registered in ``mola.models.base.ARCHS``."""

from mola.models.archs import hps, mola, single_task  # noqa: F401
