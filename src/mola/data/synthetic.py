"""Synthetic stand-ins of a scenario: its declared shape (tasks, input shape, heterogeneity) filled with random
tensors, so a config can be built and timed without the dataset (``mola train --dry-run``, paper_smoke).

A layout declares its shape with ``@SPECS.register(kind)``; the paper presets (``mola.data.layouts.paper``)
do. Random inputs train nothing useful: stand-ins exist only to build models and measure step costs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mola.data.config import DataConfig
from mola.data.layouts._common import ArrayMultiTargetDataset
from mola.registry import Registry
from mola.tasks import ALL_TASKS, ArrayTaskDataset, Heterogeneity, Scenario, TaskInfo


@dataclass
class ScenarioSpec:
    """What a scenario looks like without its data; ``train_size`` (images per epoch, when known) sizes
    time estimates."""

    name: str
    heterogeneity: Heterogeneity
    tasks: list[TaskInfo]
    input_shape: tuple[int, ...]
    shared_head: bool = False
    train_size: int | None = None
    notes: str = ""


SPECS: Registry[Callable[[DataConfig], ScenarioSpec]] = Registry("data spec")


def scenario_spec(cfg: DataConfig) -> ScenarioSpec | None:
    """The declared shape of ``cfg.kind`` (None when the layout declares none: its shape comes from its files)."""
    import mola.data.layouts  # noqa: F401  (registers the built-in layouts and their specs)

    return SPECS.get(cfg.kind)(cfg) if cfg.kind in SPECS.names() else None


def synthetic_batch(spec: ScenarioSpec, batch: int, generator: torch.Generator | None = None
                    ) -> tuple[Tensor, Tensor | dict[str, Tensor], Tensor]:
    """One collated batch ``(x, y, task_ids)`` of ``spec``'s shapes: N(0, 1) inputs, uniform labels and task ids
    (tasks in turn); single-input: per-task dense targets (segmentation with 5 % ignored pixels, positive depth,
    unit normals) and task ids ``ALL_TASKS``."""
    g = generator or torch.Generator().manual_seed(0)
    x = torch.randn(batch, *spec.input_shape, generator=g)
    if spec.heterogeneity != "single_input":
        t = torch.arange(batch) % len(spec.tasks)
        classes = torch.tensor([task.out_channels for task in spec.tasks])
        y = (torch.rand(batch, generator=g) * classes[t]).long()
        return x, y, t
    hw = spec.input_shape[-2:]
    targets: dict[str, Tensor] = {}
    for task in spec.tasks:
        if task.kind == "segmentation":
            seg = torch.randint(0, task.out_channels, (batch, *hw), generator=g)
            seg[torch.rand(batch, *hw, generator=g) < 0.05] = task.ignore_index
            targets[task.name] = seg
        elif task.kind == "depth":
            targets[task.name] = torch.rand(batch, 1, *hw, generator=g) * 10 + 0.1
        elif task.kind == "normal":
            targets[task.name] = torch.nn.functional.normalize(torch.randn(batch, 3, *hw, generator=g), dim=1)
        else:
            targets[task.name] = torch.randint(0, task.out_channels, (batch,), generator=g)
    return x, targets, torch.full((batch,), ALL_TASKS, dtype=torch.long)


def synthetic_scenario(spec: ScenarioSpec, per_task: int = 2, seed: int = 0) -> Scenario:
    """A Scenario of ``spec``'s shape with ``per_task`` random samples per task in each split."""
    g = torch.Generator().manual_seed(seed)
    n = per_task if spec.heterogeneity == "single_input" else per_task * len(spec.tasks)

    def split() -> ArrayTaskDataset | ArrayMultiTargetDataset:
        x, y, t = synthetic_batch(spec, n, g)
        if isinstance(y, dict):
            return ArrayMultiTargetDataset(x, y)
        return ArrayTaskDataset(x, y, t)

    return Scenario(name=f"{spec.name} (synthetic stand-in)", heterogeneity=spec.heterogeneity,
                    tasks=[TaskInfo(t.name, t.kind, t.num_classes, t.ignore_index) for t in spec.tasks],
                    train=split(), val=split(), test=split(), input_shape=tuple(spec.input_shape),
                    shared_head=spec.shared_head, derived=True,
                    notes=f"synthetic stand-in of {spec.name}: random tensors, no data read. {spec.notes}".strip())
