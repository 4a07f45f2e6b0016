"""Hard parameter sharing (= Uniform with equal weights): one shared encoder, one head per task."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mola.models.base import ARCHS, BackboneFactory, ModelConfig, MultiTaskModel, parse_options
from mola.tasks import Heterogeneity, TaskInfo


@dataclass
class HPSOptions:
    """HPS has no options."""


@ARCHS.register("hps")
class HPS(MultiTaskModel):
    """Shared encoder, per-task heads (one shared head for domain scenarios)."""

    Options = HPSOptions

    def __init__(self, backbone: BackboneFactory, tasks: list[TaskInfo], heterogeneity: Heterogeneity,
                 shared_head: bool, input_shape: tuple[int, ...], cfg: ModelConfig) -> None:
        super().__init__(tasks, heterogeneity, shared_head, input_shape)
        parse_options(HPSOptions, cfg.options, "hps")
        self.encoder = backbone()
        self.heads = self.make_heads(self.encoder.out_dim, cfg.head_hidden)

    def forward(self, x: Tensor, task_ids: Tensor) -> dict[int, Tensor]:
        feats = self.encoder(x)
        self.features = feats
        return self.apply_heads(feats, task_ids, self.out_size(x))
