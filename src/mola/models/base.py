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
from typing import Any, Literal, Protocol

from torch import Tensor, nn

from mola.config_utils import from_dict
from mola.inject import MoLAConfig
from mola.inject.model import trainable_parameters_line
from mola.layers.routing import check_task_ids, task_groups
from mola.models.backbones import MLP, BackboneConfig, SmallViT
from mola.models.heads import DenseHead, make_head
from mola.registry import Registry
from mola.tasks import Heterogeneity, TaskInfo


@dataclass
class ModelConfig:
    """Architecture by name, its backbone, MoLA settings (arch ``mola``) and arch-specific options."""

    arch: str = "mola"  # architecture (`mola list`): mola, hps, single_task, mmoe, ...
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    mola: MoLAConfig = field(default_factory=MoLAConfig)
    options: dict[str, Any] = field(default_factory=dict)  # options of the architecture (see its Options)
    head: Literal["auto", "pspnet"] = "auto"  # dense-task heads: auto (small conv decoder) or pspnet (PSPNet)
    head_hidden: int = 128  # hidden channels of the dense (segmentation/depth/normal) heads (PSPNet: 512)
    #: train only what the arch adds (MoLA adapters, router, lift; heads; towers...): the backbone's own weights
    #: are frozen (requires_grad False), as peft does
    freeze_backbone: bool = False


def task_rows(task_ids: Tensor, num_tasks: int) -> dict[int, Tensor]:
    """Row indices of each present task, in batch order (one host sync)."""
    return rows_of_groups(*task_groups(task_ids, num_tasks))


def rows_of_groups(order: Tensor, counts: list[int]) -> dict[int, Tensor]:
    """``task_rows`` from ``task_groups``' (order, counts): slices of the stable sort, no further sync."""
    return {t: r for t, (r, c) in enumerate(zip(order.split(counts), counts, strict=True)) if c > 0}


def _version(t: Tensor) -> int:
    try:
        return int(t._version)
    except RuntimeError:  # inference-mode tensors keep no version counter (and cannot be changed in place)
        return -1


def _check_inputs_hook(module: MultiTaskModel, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    x = args[0] if args else kwargs.get("x")
    task_ids = args[1] if len(args) > 1 else kwargs.get("task_ids")
    module.check_inputs(x, task_ids)


class MultiTaskModel(nn.Module):
    """Base of every architecture. Subclasses set ``self.heads`` and implement ``forward``."""

    #: parameter groups that belong to a single task (never aggregated by gradient methods)
    task_specific_groups: tuple[str, ...] = ("heads", "adapters", "towers")
    #: the task heads (one per task, or one shared); set by every subclass, usually via ``make_heads``
    heads: nn.ModuleList

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
        self._fixed_input_size: bool | None = None
        self._groups_cache: tuple[Tensor, int, tuple[Tensor, list[int]]] | None = None
        self.register_forward_pre_hook(_check_inputs_hook, with_kwargs=True)

    def check_inputs(self, x: Any, task_ids: Any) -> None:
        """Raise a ValueError naming the problem when ``(x, task_ids)`` cannot be what this model was built for:
        wrong input rank, channel count or (for fixed-size backbones: MLP, ViT) size; task ids that are not a
        (B,) integer tensor or are out of range. Runs before every forward (a pre-hook)."""
        if not isinstance(x, Tensor):
            raise ValueError(f"model input must be a torch.Tensor, got {type(x).__name__}")
        want = self.input_shape
        shape = tuple(x.shape)
        expected = f"(B, {', '.join(map(str, want))})"
        if x.dim() != len(want) + 1:
            raise ValueError(f"model input has shape {shape}, but this {type(self).__name__} was built for "
                             f"{len(want) + 1}-d inputs {expected}")
        if len(want) == 3 and shape[1] != want[0]:
            raise ValueError(f"model input has {shape[1]} channel(s) (shape {shape}), but the backbone was built "
                             f"for {want[0]} channel(s) {expected}; set data.channels or convert the images")
        if shape[1:] != want and (len(want) != 3 or self._fixed_size()):
            raise ValueError(f"model input has shape {shape}, but the backbone only takes inputs {expected} "
                             f"(fixed input size); set data.image_size or resize the inputs")
        if task_ids is None and self.single_input:
            return
        names = ", ".join(t.name for t in self.tasks)
        check_task_ids(task_ids, shape[0], -1 if self.single_input else 0, self.num_tasks,
                       f" for the {self.num_tasks} task(s) of this model ({names})")

    def task_groups(self, task_ids: Tensor) -> tuple[Tensor, list[int]]:
        """``task_groups`` of ``task_ids``, computed once per batch: the forward, the MoLA layers and the loss
        share it (the same tensor object and version gives the cached result)."""
        key = (task_ids, _version(task_ids))
        cached = self._groups_cache
        if cached is None or cached[0] is not key[0] or cached[1] != key[1]:
            self._groups_cache = cached = (*key, task_groups(task_ids, self.num_tasks))
        return cached[2]

    def use_task_groups(self, task_ids: Tensor, groups: tuple[Tensor, list[int]]) -> None:
        """Take ``groups`` (``task_groups`` of ``task_ids``, computed by the caller, e.g. on the host before the
        batch moved to the device) as this batch's grouping: the forward then makes no host sync for it."""
        self._groups_cache = (task_ids, _version(task_ids), groups)

    def task_rows(self, task_ids: Tensor) -> dict[int, Tensor]:
        """Row indices of each present task of ``task_ids`` (cached per batch, see ``task_groups``)."""
        return rows_of_groups(*self.task_groups(task_ids))

    def _fixed_size(self) -> bool:
        if self._fixed_input_size is None:
            self._fixed_input_size = any(isinstance(m, (MLP, SmallViT)) or getattr(m, "fixed_input_size", False)
                                         for m in self.modules())
        return self._fixed_input_size

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

    def use_dense_head(self, kind: str, hidden: int) -> None:
        """Replace every dense-task head by a ``kind`` head (``model.head``) reading the same features."""
        for i, h in enumerate(self.heads):
            if isinstance(h, DenseHead):
                task = self.tasks[0] if self.shared_head else self.tasks[i]
                self.heads[i] = make_head(task, h.in_dim, hidden, kind)

    def head(self, t: int) -> nn.Module:
        return self.heads[0] if self.shared_head else self.heads[t]

    def out_size(self, x: Tensor) -> tuple[int, int] | None:
        return (x.shape[-2], x.shape[-1]) if x.dim() == 4 else None

    def apply_heads(self, feats: Tensor, task_ids: Tensor, out_size: tuple[int, int] | None) -> dict[int, Tensor]:
        """Send each sample's features to its task's head (all heads on all samples for single-input)."""
        if self.single_input:
            return {t: self.head(t)(feats, out_size) for t in range(self.num_tasks)}
        return {t: self.head(t)(feats.index_select(0, rows), out_size)
                for t, rows in self.task_rows(task_ids).items()}

    def forward(self, x: Tensor, task_ids: Tensor) -> dict[int, Tensor]:
        raise NotImplementedError

    def extra_loss(self, gather: Callable[[Tensor], Tensor] | None = None) -> Tensor | None:
        """A non-task loss term of the last forward (MoLA-Router's lambda * TwD), or None.

        ``gather`` (under DDP) maps a per-sample tensor of this process to the rows of the whole global batch,
        autograd-aware; terms that compare samples with each other (TwD) compute on the gathered rows."""
        return None

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named, disjoint parameter groups; at least ``heads``. Used for counts and shared/task splits."""
        head_ids = {id(p) for p in self.heads.parameters()}
        rest = [p for p in self.parameters() if id(p) not in head_ids]
        return {"backbone": rest, "heads": list(self.heads.parameters())}

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for g, ps in self.parameter_groups().items() if g not in self.task_specific_groups
                for p in ps if p.requires_grad]

    def freeze_backbone(self) -> None:
        """Stop training the backbone's own weights (group ``backbone``); adapters, router and heads still train."""
        for p in self.parameter_groups().get("backbone", []):
            p.requires_grad_(False)

    def print_trainable_parameters(self) -> None:
        """Print trainable and total parameter counts (peft's method of the same name)."""
        print(trainable_parameters_line(self))

    def task_parameters(self) -> list[nn.Parameter]:
        return [p for g, ps in self.parameter_groups().items() if g in self.task_specific_groups
                for p in ps if p.requires_grad]


BackboneFactory = Callable[[], nn.Module]


class ArchBuilder(Protocol):
    """What ``ARCHS`` holds: a MultiTaskModel subclass, called as ``cls(backbone, tasks, heterogeneity,
    shared_head, input_shape, cfg)`` by ``build_model``."""

    def __call__(self, backbone: BackboneFactory, tasks: list[TaskInfo], heterogeneity: Heterogeneity,
                 shared_head: bool, input_shape: tuple[int, ...], cfg: ModelConfig, /) -> MultiTaskModel: ...


ARCHS: Registry[ArchBuilder] = Registry("arch")


def parse_options(options_cls: type, options: dict[str, Any], arch: str) -> Any:
    """Typed arch options from ``model.options`` (unknown keys are errors naming the arch)."""
    try:
        return from_dict(options_cls, options, prefix="model.options.")
    except ValueError as err:
        raise ValueError(f"arch {arch!r}: {err}") from err


def num_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts by part (backbone, adapters, router, lift, heads, ...) and ``total``."""
    if hasattr(model, "parameter_groups"):
        groups = model.parameter_groups()  # type: ignore[operator]  # duck-typed (nn.Module.__getattr__)
        out = {k: sum(p.numel() for p in v) for k, v in groups.items()}
    elif hasattr(model, "num_parameters"):
        return model.num_parameters()  # type: ignore[operator]  # duck-typed (nn.Module.__getattr__)
    else:
        out = {"backbone": sum(p.numel() for p in model.parameters())}
    out["total"] = sum(out.values())
    return out
