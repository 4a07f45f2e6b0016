"""HPS widened to MoLA-Grad's trainable-parameter count: the equal-parameter baseline for MoLA (issue 22).

MoLA-Grad adds E low-rank adapters to the backbone; an HPS gain or loss against it could be capacity, not
gradient separation. ``hps_wide`` builds the same config's MoLA-Grad model, counts its trainable parameters,
and takes the smallest backbone width (``model.backbone.width`` and up) at which plain HPS has at least as many.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor, nn

from mola.models.archs.mola import MoLANet
from mola.models.backbones import build_backbone
from mola.models.base import ARCHS, BackboneFactory, ModelConfig, MultiTaskModel, parse_options
from mola.tasks import Heterogeneity, TaskInfo

WIDTH_BACKBONES = ("small_cnn", "mlp", "vit_small")
MAX_WIDTH_FACTOR = 8


@dataclass
class HPSWideOptions:
    """How far ``hps_wide`` may widen the backbone."""

    max_width: int | None = None  # the widest backbone width tried (null: 8x model.backbone.width)


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@ARCHS.register("hps_wide")
class HPSWide(MultiTaskModel):
    """Shared encoder (widened), per-task heads; ``target_params`` and ``width`` say what it matched."""

    Options = HPSWideOptions

    def __init__(self, backbone: BackboneFactory, tasks: list[TaskInfo], heterogeneity: Heterogeneity,
                 shared_head: bool, input_shape: tuple[int, ...], cfg: ModelConfig) -> None:
        super().__init__(tasks, heterogeneity, shared_head, input_shape)
        opts = parse_options(HPSWideOptions, cfg.options, "hps_wide")
        if cfg.backbone.name not in WIDTH_BACKBONES:
            raise ValueError(f"arch hps_wide widens model.backbone.width, which only {', '.join(WIDTH_BACKBONES)} "
                             f"have; backbone {cfg.backbone.name!r} has no width setting")
        grad = dataclasses.replace(cfg, arch="mola", options={},
                                   mola=dataclasses.replace(cfg.mola, mode="grad"))
        self.target_params = trainable(MoLANet(backbone, tasks, heterogeneity, shared_head, input_shape, grad))
        dense = any(t.kind != "classification" for t in tasks)
        start = cfg.backbone.width
        limit = opts.max_width or MAX_WIDTH_FACTOR * start
        if limit < start:
            raise ValueError(f"model.options.max_width={limit} is below model.backbone.width={start}")
        for width in range(start, limit + 1):
            self.encoder = build_backbone(dataclasses.replace(cfg.backbone, width=width), input_shape, dense)
            self.heads = self.make_heads(self.encoder.out_dim, cfg.head_hidden)
            if trainable(self) >= self.target_params:
                break
        else:
            raise ValueError(f"arch hps_wide: no backbone width up to {limit} reaches MoLA-Grad's "
                             f"{self.target_params:,} trainable parameters; raise model.options.max_width")
        self.width = width

    def forward(self, x: Tensor, task_ids: Tensor) -> Tensor | dict[int, Tensor]:
        feats = self.encoder(x)
        self.features = feats
        return self.apply_heads(feats, task_ids, self.out_size(x))
