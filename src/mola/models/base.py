"""The architecture contract: a MultiTaskModel maps (x, task_ids) to per-task outputs; ModelConfig; ARCHS.

Output convention of ``forward(x, task_ids) -> dict[int, Tensor]``:
- domain / multi-input: entry t holds the outputs of the samples with ``task_ids == t``, in batch order
  (``task_rows`` gives those rows); absent tasks have no entry;
- single-input: entry t holds task t's outputs for every sample.
``self.features`` keeps the shared representation of the last forward (for "-UB" gradient methods).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mola.config_utils import from_dict
from mola.data.base import Heterogeneity, TaskInfo
from mola.inject import MoLAConfig
from mola.models.backbones import BackboneConfig
from mola.models.heads import make_head
from mola.registry import Registry


@dataclass
class ModelConfig:
    """Architecture by name, its backbone, MoLA settings (arch ``mola``) and arch-specific options."""

    arch: str = "mola"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    mola: MoLAConfig = field(default_factory=MoLAConfig)
    options: dict[str, Any] = field(default_factory=dict)
    head_hidden: int = 128


def task_rows(task_ids: Tensor, num_tasks: int) -> dict[int, Tensor]:
    """Row indices of each present task, in batch order (one host sync)."""
    counts = torch.bincount(task_ids, minlength=num_tasks).tolist()
    if len(counts) > num_tasks:
        raise ValueError(f"task id {len(counts) - 1} out of range [0, {num_tasks})")
    return {t: torch.nonzero(task_ids == t).squeeze(1) for t, c in enumerate(counts) if c > 0}


class MultiTaskModel(nn.Module):
    """Base of every architecture. Subclasses set ``self.heads`` and implement ``forward``."""

    #: parameter groups that belong to a single task (never aggregated by gradient methods)
    task_specific_groups: tuple[str, ...] = ("heads", "adapters", "towers")

    def __init__(self, tasks: list[TaskInfo], heterogeneity: Heterogeneity, shared_head: bool,
                 input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.tasks = tasks
        self.num_tasks = len(tasks)
        self.heterogeneity = heterogeneity
        self.shared_head = shared_head
        self.input_shape = tuple(input_shape)
        self.features: Tensor | None = None
        self.feature_dim: int | None = None

    @property
    def single_input(self) -> bool:
        return self.heterogeneity == "single_input"

    def make_heads(self, in_dim: int, hidden: int = 128) -> nn.ModuleList:
        """One head per task, or one shared head when all tasks share a label space (domain scenarios).

        ``in_dim`` is the channel size of the features the heads read; it is kept as ``feature_dim``.
        """
        self.feature_dim = in_dim
        if self.shared_head:
            return nn.ModuleList([make_head(self.tasks[0], in_dim, hidden)])
        return nn.ModuleList([make_head(t, in_dim, hidden) for t in self.tasks])

    def head(self, t: int) -> nn.Module:
        return self.heads[0] if self.shared_head else self.heads[t]

    def out_size(self, x: Tensor) -> tuple[int, int] | None:
        return (x.shape[-2], x.shape[-1]) if x.dim() == 4 else None

    def apply_heads(self, feats: Tensor, task_ids: Tensor, out_size: tuple[int, int] | None) -> dict[int, Tensor]:
        """Send each sample's features to its task's head (all heads on all samples for single-input)."""
        if self.single_input:
            return {t: self.head(t)(feats, out_size) for t in range(self.num_tasks)}
        return {t: self.head(t)(feats.index_select(0, rows), out_size)
                for t, rows in task_rows(task_ids, self.num_tasks).items()}

    def forward(self, x: Tensor, task_ids: Tensor) -> dict[int, Tensor]:
        raise NotImplementedError

    def extra_loss(self) -> Tensor | None:
        """A non-task loss term of the last forward (MoLA-Router's lambda * TwD), or None."""
        return None

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named, disjoint parameter groups; at least ``heads``. Used for counts and shared/task splits."""
        head_ids = {id(p) for p in self.heads.parameters()}
        rest = [p for p in self.parameters() if id(p) not in head_ids]
        return {"backbone": rest, "heads": list(self.heads.parameters())}

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for g, ps in self.parameter_groups().items() if g not in self.task_specific_groups
                for p in ps if p.requires_grad]

    def task_parameters(self) -> list[nn.Parameter]:
        return [p for g, ps in self.parameter_groups().items() if g in self.task_specific_groups
                for p in ps if p.requires_grad]


BackboneFactory = Callable[[], nn.Module]
ARCHS: Registry[type[MultiTaskModel]] = Registry("arch")


def parse_options(options_cls: type, options: dict[str, Any], arch: str) -> Any:
    """Typed arch options from ``model.options`` (unknown keys are errors naming the arch)."""
    try:
        return from_dict(options_cls, options, prefix="model.options.")
    except ValueError as err:
        raise ValueError(f"arch {arch!r}: {err}") from err


def num_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts by part (backbone, adapters, router, lift, heads, ...) and ``total``."""
    if hasattr(model, "parameter_groups"):
        groups = model.parameter_groups()
        out = {k: sum(p.numel() for p in v) for k, v in groups.items()}
    elif hasattr(model, "num_parameters"):
        return model.num_parameters()
    else:
        out = {"backbone": sum(p.numel() for p in model.parameters())}
    out["total"] = sum(out.values())
    return out
