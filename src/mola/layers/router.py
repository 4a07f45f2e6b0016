"""The shared router and the lift to TwD codes (docs/concepts.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AUTO_INPUT_SIZE = 32  # router_input_size "auto": the side the CIFAR-style router was designed for


class BasicBlock(nn.Module):
    """CIFAR-style residual block: two 3x3 conv-BN, ReLU, 1x1 conv-BN shortcut when shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Router(nn.Module):
    """Small CIFAR-style residual net: stem + 3 stages x ``blocks`` basic blocks, pool, Linear -> E logits.

    ``input_size`` resizes the router's copy of the input (bilinear) so the router stays cheap next to the
    backbone; None keeps the input size; "auto" resizes to ``AUTO_INPUT_SIZE`` only inputs with a larger side.
    ``stem_stride`` 2 halves the resolution the blocks work at.
    """

    def __init__(
        self,
        in_channels: int,
        num_experts: int,
        widths: tuple[int, int, int] = (16, 32, 64),
        blocks: int = 3,
        input_size: int | str | None = None,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        if blocks < 1 or stem_stride not in (1, 2) or min(widths) < 1:
            raise ValueError(f"Router: blocks must be >= 1, stem_stride 1 or 2 and widths >= 1, got blocks={blocks}, "
                             f"stem_stride={stem_stride}, widths={widths}")
        self.input_size = input_size
        self.in_channels = in_channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, cout in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_experts)

    def resolved_input_size(self, hw: tuple[int, ...]) -> int | None:
        """The side the router resizes an input of spatial size ``hw`` to (None: no resize)."""
        if self.input_size == "auto":
            return AUTO_INPUT_SIZE if max(hw) > AUTO_INPUT_SIZE else None
        return self.input_size  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"Router expects images (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}; "
                "set router_in_channels or router_type='mlp' for other inputs"
            )
        size = self.resolved_input_size(tuple(x.shape[-2:]))
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        h = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class MLPRouter(nn.Module):
    """Router for non-image inputs (feature vectors, tokens): flatten, two hidden layers, Linear -> E."""

    def __init__(self, in_features: int, num_experts: int, hidden: int = 64) -> None:
        super().__init__()
        self.in_features = in_features
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, num_experts),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"MLPRouter expects {self.in_features} input features, got {x.shape[1]}")
        return self.net(x)


class Lift(nn.Module):
    """Maps router logits (or softmax weights) in R^E to a TwD code z in R^d: Linear, or a 2-layer MLP."""

    def __init__(self, num_experts: int, dim: int = 32, hidden: int | None = None) -> None:
        super().__init__()
        if hidden:
            self.net: nn.Module = nn.Sequential(nn.Linear(num_experts, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        else:
            self.net = nn.Linear(num_experts, dim)

    def forward(self, s: Tensor) -> Tensor:
        return self.net(s)
