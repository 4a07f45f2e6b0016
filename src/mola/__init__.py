"""mola: train one model on heterogeneous data with a Mixture of Low-rank Adapters."""

from mola._version import __version__
from mola.inject import MoLAConfig, MoLAModel, inject
from mola.layers import MoLAConv2d, MoLALinear, Router, twd_loss
from mola.models.base import num_parameters

__all__ = ["MoLAConfig", "MoLAConv2d", "MoLALinear", "MoLAModel", "Router", "__version__", "inject", "num_parameters",
           "twd_loss"]
