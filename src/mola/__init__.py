"""mola: train one model on heterogeneous data with a Mixture of Low-rank Adapters."""

__version__ = "0.1.0"

from mola.inject import MoLAConfig, MoLAModel, inject  # noqa: E402
from mola.layers import MoLAConv2d, MoLALinear, Router, twd_loss  # noqa: E402
from mola.models.base import num_parameters  # noqa: E402

__all__ = ["MoLAConfig", "MoLAConv2d", "MoLALinear", "MoLAModel", "Router", "__version__", "inject", "num_parameters",
           "twd_loss"]
