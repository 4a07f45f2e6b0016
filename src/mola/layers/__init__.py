"""Pure-torch MoLA building blocks: adapter layers, routing state, router, lift and TwD loss."""

from mola.layers.adapter import MoLALayer
from mola.layers.mola_conv import MoLAConv2d
from mola.layers.mola_linear import MoLALinear
from mola.layers.router import Lift, MLPRouter, Router
from mola.layers.routing import Routing
from mola.layers.twd import twd_loss

__all__ = ["Lift", "MLPRouter", "MoLAConv2d", "MoLALayer", "MoLALinear", "Router", "Routing", "twd_loss"]
