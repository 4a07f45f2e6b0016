"""Backbones by name. Each maps an input batch to features: a map (B, C, h, w) for conv nets and ViTs in
dense mode, a vector (B, C) for MLPs and ViTs otherwise; ``out_dim`` is C. Weights come only from local files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mola.inject import find_stages
from mola.layers.router import BasicBlock
from mola.registry import Registry

if TYPE_CHECKING:
    from torchvision.models import ResNet
    from torchvision.models.resnet import BasicBlock as TVBasicBlock


@dataclass
class BackboneConfig:
    """Which backbone and how to build it; ``weights`` is a local state-dict file (never downloaded)."""

    name: str = "small_cnn"  # small_cnn, resnet18, resnet50, mlp, vit_small or timm:<model name>
    weights: str | None = None  # local state-dict file to initialise from (classifier keys skipped)
    dilated: bool | None = None  # keep resolution in the last stages (null: only for dense tasks)
    small_input: bool | None = None  # ResNet 3x3 stem without max-pool (null: when the input side <= 64)
    width: int = 32  # small_cnn base width; mlp hidden sizes 16w, 8w; vit_small dim 4w
    #: builder options: mlp {hidden, dropout, norm: batch|none}; vit_small {patch, dim, depth, heads, mlp_ratio};
    #: timm:<name> keyword arguments of timm.create_model
    options: dict[str, Any] = field(default_factory=dict)


BackboneBuilder = Callable[[tuple[int, ...], BackboneConfig, bool], nn.Module]
BACKBONES: Registry[BackboneBuilder] = Registry("backbone")


def load_local_weights(model: nn.Module, path: str, skip_prefixes: tuple[str, ...] = ("fc.", "head.")) -> None:
    """Load a local state dict (weights_only), ignoring classifier keys and input-layer shape mismatches."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {p} (weights are never downloaded)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ValueError(f"cannot read backbone weights {p}: {err}") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = model.state_dict()
    keep = {k: v for k, v in state.items()
            if k in own and not k.startswith(skip_prefixes) and v.shape == own[k].shape}
    if not keep:
        raise ValueError(f"backbone weights {p} share no tensor with {type(model).__name__}")
    model.load_state_dict(keep, strict=False)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without pool/fc; stem and layer1..layer4 stay top-level so MoLA presets apply."""

    output = "map"

    def __init__(self, net: ResNet, in_channels: int, small_input: bool) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        elif in_channels != 3:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.out_dim = net.fc.in_features

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _dilate_basic_stage(stage: nn.Sequential, dilation: int) -> None:
    """Make a BasicBlock stage keep resolution: stride 1, dilated 3x3 convs (torchvision only does Bottleneck)."""
    for block in cast("Iterable[TVBasicBlock]", stage):
        for conv in (block.conv1, block.conv2):
            conv.stride, conv.dilation, conv.padding = (1, 1), (dilation, dilation), (dilation, dilation)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


def _resnet(depth: int) -> BackboneBuilder:
    def build(input_shape: tuple[int, ...], cfg: BackboneConfig, dense: bool) -> nn.Module:
        import torchvision

        if len(input_shape) != 3:
            raise ValueError(f"resnet{depth} needs image inputs (C, H, W), got input shape {input_shape}")
        dilated = dense if cfg.dilated is None else cfg.dilated
        small = min(input_shape[1:]) <= 64 if cfg.small_input is None else cfg.small_input
        ctor = getattr(torchvision.models, f"resnet{depth}")
        if depth >= 50:
            net = ctor(weights=None, replace_stride_with_dilation=[False, dilated, dilated])
        else:
            net = ctor(weights=None)
            if dilated:
                _dilate_basic_stage(net.layer3, 2)
                _dilate_basic_stage(net.layer4, 4)
        if cfg.weights:
            load_local_weights(net, cfg.weights)
        return ResNetBackbone(net, input_shape[0], small)

    return build


BACKBONES.register("resnet18")(_resnet(18))
BACKBONES.register("resnet50")(_resnet(50))



class SmallCNN(nn.Module):
    """A 4-stage residual CNN (one block per stage, widths w, 2w, 4w, 8w) for 28-64 px inputs."""

    output = "map"
    layer1: BasicBlock
    layer2: BasicBlock
    layer3: BasicBlock
    layer4: BasicBlock

    def __init__(self, in_channels: int, width: int = 32, dilated: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        widths = [width, 2 * width, 4 * width, 8 * width]
        strides = [1, 2, 1, 1] if dilated else [1, 2, 2, 2]
        cin = width
        for i, (w, s) in enumerate(zip(widths, strides, strict=True), start=1):
            setattr(self, f"layer{i}", BasicBlock(cin, w, s))
            cin = w
        self.out_dim = cin

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


@BACKBONES.register("small_cnn")
def _small_cnn(input_shape: tuple[int, ...], cfg: BackboneConfig, dense: bool) -> nn.Module:
    if len(input_shape) != 3:
        raise ValueError(f"small_cnn needs image inputs (C, H, W), got input shape {input_shape}")
    net = SmallCNN(input_shape[0], cfg.width, dense if cfg.dilated is None else cfg.dilated)
    if cfg.weights:
        load_local_weights(net, cfg.weights)
    return net


class MLP(nn.Module):
    """Feature-vector backbone: stages ``layer1..layerN`` of Linear-BN-ReLU-Dropout (``norm="none"``: no BN)."""

    output = "vector"

    def __init__(self, in_features: int, hidden: list[int], dropout: float = 0.1, norm: str = "batch") -> None:
        super().__init__()
        if norm not in ("batch", "none"):
            raise ValueError(f"mlp backbone: unknown norm {norm!r}; accepted: 'batch', 'none'")
        cin = in_features
        self.mola_stages = []
        for i, h in enumerate(hidden, start=1):
            bn: nn.Module = nn.BatchNorm1d(h) if norm == "batch" else nn.Identity()
            setattr(self, f"layer{i}", nn.Sequential(nn.Linear(cin, h), bn, nn.ReLU(), nn.Dropout(dropout)))
            self.mola_stages.append(f"layer{i}")
            cin = h
        self.out_dim = cin

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for name in self.mola_stages:
            x = getattr(self, name)(x)
        return x


@BACKBONES.register("mlp")
def _mlp(input_shape: tuple[int, ...], cfg: BackboneConfig, dense: bool) -> nn.Module:
    if dense:
        raise ValueError("the mlp backbone cannot serve dense (per-pixel) tasks; use a conv backbone")
    hidden = list(cfg.options.get("hidden", [16 * cfg.width, 8 * cfg.width]))
    net = MLP(int(torch.tensor(input_shape).prod()), hidden, float(cfg.options.get("dropout", 0.1)),
              str(cfg.options.get("norm", "batch")))
    if cfg.weights:
        load_local_weights(net, cfg.weights)
    return net


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SmallViT(nn.Module):
    """A small pre-norm ViT (timm-style names: patch_embed.proj, blocks.N.mlp.fc1/fc2) with mean pooling.

    In dense mode it returns the patch tokens as a (B, D, H/p, W/p) map for the dense heads.
    """

    def __init__(self, in_channels: int, image_size: tuple[int, int], patch: int, dim: int, depth: int,
                 heads: int, mlp_ratio: float = 4.0, dense: bool = False) -> None:
        super().__init__()
        if image_size[0] % patch or image_size[1] % patch:
            raise ValueError(f"SmallViT: image size {image_size} is not divisible by patch size {patch}")
        self.grid = (image_size[0] // patch, image_size[1] // patch)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_channels, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.out_dim = dim
        self.dense = dense
        self.output = "map" if dense else "vector"

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_embed  # type: ignore[operator]
        tokens = self.norm(self.blocks(tokens))
        if self.dense:
            return tokens.transpose(1, 2).reshape(x.shape[0], -1, *self.grid)
        return tokens.mean(dim=1)


@BACKBONES.register("vit_small")
def _vit_small(input_shape: tuple[int, ...], cfg: BackboneConfig, dense: bool) -> nn.Module:
    if len(input_shape) != 3:
        raise ValueError(f"vit_small needs image inputs (C, H, W), got input shape {input_shape}")
    o = cfg.options
    default_patch = 4 if min(input_shape[1:]) <= 64 else 16
    net = SmallViT(input_shape[0], (input_shape[1], input_shape[2]), int(o.get("patch", default_patch)),
                   int(o.get("dim", 4 * cfg.width)), int(o.get("depth", 6)), int(o.get("heads", 4)),
                   float(o.get("mlp_ratio", 4.0)), dense)
    if cfg.weights:
        load_local_weights(net, cfg.weights)
    return net


class TimmBackbone(nn.Module):
    """Any timm model by name (``timm:<name>``), classifier removed; maps for CNNs, pooled tokens for ViTs."""

    def __init__(self, net: Any, dense: bool) -> None:  # net: a timm model (untyped nn.Module)
        super().__init__()
        self.net = net
        self.out_dim = int(net.num_features)
        self.dense = dense
        self.output = "map" if dense else "vector"
        try:
            prefixes, kind = find_stages(net)
        except ValueError:  # no known stage layout: target_modules must then name modules
            prefixes, kind = [], "any"
        self.mola_stages = [f"net.{p}" for p in prefixes]
        self.mola_stage_modules = kind

    def forward(self, x: Tensor) -> Tensor:
        feats = self.net.forward_features(x)
        if self.dense:
            if feats.dim() != 4:
                raise ValueError("this timm model returns tokens, not a feature map: it cannot serve dense tasks")
            return feats
        return self.net.forward_head(feats, pre_logits=True)


def build_backbone(cfg: BackboneConfig, input_shape: tuple[int, ...], dense: bool) -> nn.Module:
    """Build the backbone named ``cfg.name`` (``timm:<model>`` for any timm model when timm is installed)."""
    if cfg.name.startswith("timm:"):
        try:
            import timm
        except ImportError as err:
            raise ValueError(f"backbone {cfg.name!r} needs timm: pip install 'mola[timm]'") from err
        net = timm.create_model(cfg.name[5:], pretrained=False, num_classes=0, in_chans=input_shape[0],
                                **cfg.options)
        if cfg.weights:
            load_local_weights(net, cfg.weights)
        return TimmBackbone(net, dense)
    return BACKBONES.get(cfg.name)(tuple(input_shape), cfg, dense)
