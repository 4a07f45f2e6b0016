"""Backbones by name. Each maps an input batch to features: a map (B, C, h, w) for conv nets and ViTs in
dense mode, a vector (B, C) for MLPs and ViTs otherwise; ``out_dim`` is C.

Weights (``model.backbone.weights``): a local state-dict file, a torchvision weight name (``IMAGENET1K_V1``,
``DEFAULT`` or the enum's full name ``ResNet18_Weights.IMAGENET1K_V1``) for the torchvision backbones, or
``pretrained`` for ``timm:<name>``. Named weights go through the libraries' own loaders and caches (torch hub:
``$TORCH_HOME/hub/checkpoints``; Hugging Face: ``$HF_HOME/hub``), so a file placed there is used offline.
The classifier of the source model is dropped (the task heads replace it); a 3-channel input layer is adapted
to other channel counts (1 channel: the sum of the RGB filters, as timm does). Loading lives in mola.models.weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mola.inject import find_stage_groups
from mola.layers.router import BasicBlock
from mola.models.weights import load_weights
from mola.registry import Registry

if TYPE_CHECKING:
    from torchvision.models import ResNet, ShuffleNetV2, VisionTransformer
    from torchvision.models.resnet import BasicBlock as TVBasicBlock


@dataclass
class BackboneConfig:
    """Which backbone and how to build it; ``weights``: a local file, a torchvision weight name or timm's
    ``pretrained`` (loaded through the libraries' caches; see the module docstring)."""

    #: small_cnn, resnet18, resnet50, shufflenet_v2_x1_0, vit_b_16, mlp, vit_small or timm:<model name>
    name: str = "small_cnn"
    #: initial weights: a local state-dict file, a torchvision weight name (IMAGENET1K_V1, DEFAULT,
    #: ResNet50_Weights.IMAGENET1K_V2) or `pretrained` (timm:<name>); the classifier is dropped
    weights: str | None = None
    strict: bool = True  # weights must fit the backbone (no missing/unexpected/mis-shaped key); false: load the rest
    dilated: bool | None = None  # keep resolution in the last stages (null: only for dense tasks)
    #: ResNet/ShuffleNet 3x3 stride-1 stem without max-pool; null: when the input side <= 64 and no weights are
    #: loaded (pretrained weights keep the stem they were trained with)
    small_input: bool | None = None
    width: int = 32  # small_cnn base width; mlp hidden sizes 16w, 8w; vit_small dim 4w
    #: builder options: mlp {hidden, dropout, norm: batch|none}; vit_small {patch, dim, depth, heads, mlp_ratio};
    #: timm:<name> keyword arguments of timm.create_model
    options: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Backbone(Protocol):
    """What a backbone builder returns (docs/own_model.md): an ``nn.Module`` whose forward maps inputs to features,
    a map (B, C, h, w) or a vector (B, C), with

    - ``out_dim`` (int): C, the feature size the task heads read;
    - optionally ``mola_stages`` (module names, or lists of names, one per stage): the stages the MoLA presets
      (``model.mola.targets``) and cross-stitch units address, when the default stage search cannot find them;
    - optionally ``fixed_input_size`` (bool): True when the backbone takes only its built input size (MLP, ViT).
    """

    out_dim: int

    def __call__(self, x: Tensor) -> Tensor: ...


def check_backbone(net: Any, name: str) -> nn.Module:
    """``net`` if it fulfils ``Backbone``; otherwise a TypeError naming backbone ``name``, the missing or bad
    attribute and the fix."""
    fix = f"backbone {name!r} built a {type(net).__name__}"
    if not isinstance(net, nn.Module):
        raise TypeError(f"{fix}, not a torch.nn.Module; a backbone builder must return one (docs/own_model.md)")
    out_dim = getattr(net, "out_dim", None)
    if not isinstance(out_dim, int) or isinstance(out_dim, bool) or out_dim <= 0:
        raise TypeError(f"{fix} without a positive int `out_dim` (got {out_dim!r}): set self.out_dim to the feature "
                        "size its forward returns (docs/own_model.md)")
    stages = getattr(net, "mola_stages", None)
    if stages is not None:
        names = dict(net.named_modules())
        listed = [stages] if isinstance(stages, str) else list(stages)
        # a stage is one module name or a list of them (a group: e.g. timm feature stacks grouped by resolution)
        flat = [n for s in listed for n in (s if isinstance(s, (list, tuple)) else [s])]
        bad = [n for n in flat if not isinstance(n, str) or n not in names] or ([stages] if isinstance(stages, str)
                                                                                else [])
        if bad or not flat:
            raise TypeError(f"{fix} whose `mola_stages` names no submodule: {bad or listed}; list its stage modules' "
                            "names (or lists of names, one list per stage)")
    fixed = getattr(net, "fixed_input_size", False)
    if not isinstance(fixed, bool):
        raise TypeError(f"{fix} whose `fixed_input_size` is {fixed!r}, not a bool")
    return net


BackboneBuilder = Callable[[tuple[int, ...], BackboneConfig, bool], nn.Module]


class BackboneRegistry(Registry[BackboneBuilder]):
    """The backbone registry: a builder registered here has every module it builds checked against the
    ``Backbone`` protocol (``check_backbone``), so a missing ``out_dim`` fails at build time with its name."""

    def register(self, name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
        add = super().register(name)

        def deco(builder: BackboneBuilder) -> BackboneBuilder:
            if not callable(builder):
                raise TypeError(f"backbone {name!r}: register a builder (input_shape, cfg, dense) -> nn.Module, "
                                f"got {type(builder).__name__}")

            @functools.wraps(builder)
            def checked(input_shape: tuple[int, ...], cfg: BackboneConfig, dense: bool) -> nn.Module:
                return check_backbone(builder(input_shape, cfg, dense), name)

            add(checked)
            return builder

        return deco


BACKBONES: BackboneRegistry = BackboneRegistry("backbone")


def auto_small_input(input_shape: tuple[int, ...], cfg: BackboneConfig) -> bool:
    """``cfg.small_input``, or (null) True for inputs of side <= 64 without weights: a pretrained stem is kept,
    since the weights only fit the shape they were trained with."""
    if cfg.small_input is not None:
        return cfg.small_input
    return min(input_shape[1:]) <= 64 and not cfg.weights


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
        small = auto_small_input(input_shape, cfg)
        ctor = getattr(torchvision.models, f"resnet{depth}")
        if depth >= 50:
            net = ctor(weights=None, replace_stride_with_dilation=[False, dilated, dilated])
        else:
            net = ctor(weights=None)
            if dilated:
                _dilate_basic_stage(net.layer3, 2)
                _dilate_basic_stage(net.layer4, 4)
        backbone = ResNetBackbone(net, input_shape[0], small)
        load_weights(backbone, cfg, f"resnet{depth}")
        return backbone

    return build


BACKBONES.register("resnet18")(_resnet(18))
BACKBONES.register("resnet50")(_resnet(50))


class ShuffleNetV2Backbone(nn.Module):
    """torchvision's ShuffleNetV2 without pool/fc: conv1, maxpool, stage2..stage4, conv5 (1x1 to ``out_dim``).

    MoLA presets see three stages (``stage2..stage4``; ``last_stage`` = ``stage4``); ``conv5`` is not a stage.
    ``small_input`` makes the stem stride 1 without max-pool (output stride 8 instead of 32).
    """

    output = "map"
    mola_stages = ("stage2", "stage3", "stage4")
    mola_stage_modules = "conv"

    def __init__(self, net: ShuffleNetV2, in_channels: int, small_input: bool) -> None:
        super().__init__()
        self.conv1, self.maxpool = net.conv1, net.maxpool
        self.stage2, self.stage3, self.stage4, self.conv5 = net.stage2, net.stage3, net.stage4, net.conv5
        stem = cast(nn.Conv2d, self.conv1[0])
        if small_input or in_channels != stem.in_channels:
            self.conv1[0] = nn.Conv2d(in_channels, stem.out_channels, 3, 1 if small_input else 2, 1, bias=False)
        if small_input:
            self.maxpool = nn.Identity()
        self.out_dim = net.fc.in_features

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv1(x))
        return self.conv5(self.stage4(self.stage3(self.stage2(x))))


@BACKBONES.register("shufflenet_v2_x1_0")
def _shufflenet(input_shape: tuple[int, ...], cfg: BackboneConfig, dense: bool) -> nn.Module:
    import torchvision

    if len(input_shape) != 3:
        raise ValueError(f"shufflenet_v2_x1_0 needs image inputs (C, H, W), got input shape {input_shape}")
    if cfg.dilated:
        raise ValueError("shufflenet_v2_x1_0 has no dilated variant (model.backbone.dilated must be null/false)")
    small = auto_small_input(input_shape, cfg)
    backbone = ShuffleNetV2Backbone(torchvision.models.shufflenet_v2_x1_0(weights=None), input_shape[0], small)
    load_weights(backbone, cfg, "shufflenet_v2_x1_0")
    return backbone


class TorchvisionViT(nn.Module):
    """torchvision's ViT (e.g. ViT-B/16) without its classifier: the class token's feature (B, D), or in dense
    mode the patch tokens as a (B, D, H/p, W/p) map. ``encoder.layers`` are the stages MoLA presets see."""

    fixed_input_size = True

    def __init__(self, net: VisionTransformer, in_channels: int, dense: bool) -> None:
        super().__init__()
        self.conv_proj, self.class_token, self.encoder = net.conv_proj, net.class_token, net.encoder
        if in_channels != self.conv_proj.in_channels:
            p = net.patch_size
            self.conv_proj = nn.Conv2d(in_channels, net.hidden_dim, p, p)
        self.out_dim = net.hidden_dim
        self.dense = dense
        self.output = "map" if dense else "vector"

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        grid = self.conv_proj(x)
        tokens = torch.cat([self.class_token.expand(n, -1, -1), grid.flatten(2).transpose(1, 2)], dim=1)
        tokens = self.encoder(tokens)
        if self.dense:
            return tokens[:, 1:].transpose(1, 2).reshape(n, -1, *grid.shape[-2:])
        return tokens[:, 0]


@BACKBONES.register("vit_b_16")
def _vit_b_16(input_shape: tuple[int, ...], cfg: BackboneConfig, dense: bool) -> nn.Module:
    import torchvision
    from torchvision.models.vision_transformer import interpolate_embeddings

    if len(input_shape) != 3 or input_shape[1] != input_shape[2] or input_shape[1] % 16:
        raise ValueError(f"vit_b_16 needs square image inputs (C, S, S) with S divisible by 16, got {input_shape}")
    size = input_shape[1]
    backbone = TorchvisionViT(torchvision.models.vit_b_16(weights=None, image_size=size, **cfg.options),
                              input_shape[0], dense)

    def resize_positions(state: dict[str, Tensor]) -> dict[str, Tensor]:
        pos = state.get("encoder.pos_embedding")
        if pos is None or pos.shape == backbone.encoder.pos_embedding.shape:
            return state
        return dict(interpolate_embeddings(size, 16, state))

    load_weights(backbone, cfg, "vit_b_16", resize_positions)
    return backbone



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
    load_weights(net, cfg, None)
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
    load_weights(net, cfg, None)
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
    load_weights(net, cfg, None)
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
            groups, kind = find_stage_groups(net)
        except ValueError:  # no known stage layout: target_modules must then name modules
            groups, kind = [], "any"
        self.mola_stages = [[f"net.{p}" for p in g] for g in groups]
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
        pretrained = cfg.weights == "pretrained"
        try:
            net = timm.create_model(cfg.name[5:], pretrained=pretrained, num_classes=0, in_chans=input_shape[0],
                                    **cfg.options)
        except Exception as err:  # noqa: BLE001 - offline hub errors come in many types
            if not pretrained or "Unknown model" in str(err):
                raise
            raise FileNotFoundError(_timm_offline_message(cfg.name[5:], err)) from None
        if cfg.weights and not pretrained:
            load_weights(net, cfg, None)
        return check_backbone(TimmBackbone(net, dense), cfg.name)
    return BACKBONES.get(cfg.name)(tuple(input_shape), cfg, dense)


def _timm_offline_message(model: str, err: Exception) -> str:
    """One line: which Hugging Face file timm wanted, the cache folder it looked in, and how to place it."""
    import timm
    from huggingface_hub import constants

    pcfg = timm.models.get_pretrained_cfg(model)
    repo = getattr(pcfg, "hf_hub_id", None) or f"timm/{model}"
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return (f"timm pretrained weights for {model!r}: model.safetensors of the Hugging Face repo {repo} is not in "
            f"the cache {constants.HF_HUB_CACHE} and could not be downloaded ({first}); on a machine with network "
            f"run `python -c \"from huggingface_hub import snapshot_download; snapshot_download('{repo}')\"` (any "
            f"huggingface_hub version) and copy its cache folder models--{repo.replace('/', '--')} "
            "into that cache (HF_HOME sets its root; HF_HUB_OFFLINE=1 reads it without network), or set "
            "model.backbone.weights to a local state-dict file")
