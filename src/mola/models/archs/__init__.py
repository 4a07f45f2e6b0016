"""Baseline architectures and MoLA, one file each, registered in ``mola.models.base.ARCHS``."""

from mola.models.archs import (  # noqa: F401
    cgc,
    cross_stitch,
    dselect_k,
    hps,
    hps_wide,
    ltb,
    mmoe,
    mola,
    mtan,
    single_task,
)
