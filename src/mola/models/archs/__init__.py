"""Baseline architectures and MoLA, one file each, registered in ``mola.models.base.ARCHS``."""

from mola.models.archs import cgc, cross_stitch, dselect_k, hps, ltb, mmoe, mola, mtan, single_task  # noqa: F401
