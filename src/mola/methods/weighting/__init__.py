"""Loss-weighting methods (they only rescale the per-task losses), registered in WEIGHTINGS."""

from mola.methods.weighting import dwa, ew, gradnorm, rlw

__all__ = ["dwa", "ew", "gradnorm", "rlw"]
