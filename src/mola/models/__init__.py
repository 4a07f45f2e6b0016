"""Backbones (registry by name), task heads and multi-task architectures (``model.arch``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mola.models.backbones import BACKBONES, Backbone, BackboneConfig, build_backbone
from mola.models.base import ARCHS, ModelConfig, MultiTaskModel, num_parameters, task_rows
from mola.tasks import Scenario

if TYPE_CHECKING:
    from torch import nn


def build_model(scenario: Scenario, cfg: ModelConfig) -> MultiTaskModel:
    """The architecture ``cfg.arch`` over backbone ``cfg.backbone`` for ``scenario``'s tasks and inputs."""
    import mola.models.archs  # noqa: F401  (registers the built-in architectures)

    dense = any(t.spec.dense for t in scenario.tasks)
    arch = ARCHS.get(cfg.arch)

    def factory() -> nn.Module:
        return build_backbone(cfg.backbone, scenario.input_shape, dense)

    model = arch(factory, scenario.tasks, scenario.heterogeneity, scenario.shared_head, scenario.input_shape, cfg)
    if cfg.head != "auto":
        model.use_dense_head(cfg.head, cfg.head_hidden)
    if cfg.freeze_backbone:
        model.freeze_backbone()
    return model


__all__ = ["ARCHS", "BACKBONES", "Backbone", "BackboneConfig", "ModelConfig", "MultiTaskModel", "build_backbone",
           "build_model", "num_parameters", "task_rows"]
