"""The task types every layer shares: TaskInfo, Scenario and TaskDataset (items: input, target, task id).

Plain types with no mola imports, below models, metrics and data (``mola.data.base`` re-exports them), so a
model or a metric can name them without importing the data package."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

Heterogeneity = Literal["domain", "multi_input", "single_input"]
TaskKind = Literal["classification", "segmentation", "depth", "normal"]

ALL_TASKS = -1
"""Task id carried by single-input samples: every task applies to every sample."""


@dataclass(frozen=True)
class KindSpec:
    """What a task kind means to every layer (heads, losses, meters, data checks), in one place.

    ``classes``: the head scores ``num_classes`` classes (cross-entropy); ``dense``: per-pixel outputs and targets
    (a dense head); ``channels``: the fixed output channels of a regression kind; ``unit_vectors``: outputs are
    normalised to unit length (surface normals)."""

    name: str
    classes: bool
    dense: bool
    channels: int | None = None
    unit_vectors: bool = False


TASK_KINDS: dict[str, KindSpec] = {
    "classification": KindSpec("classification", classes=True, dense=False),
    "segmentation": KindSpec("segmentation", classes=True, dense=True),
    "depth": KindSpec("depth", classes=False, dense=True, channels=1),
    "normal": KindSpec("normal", classes=False, dense=True, channels=3, unit_vectors=True),
}
"""The task kinds by name; ``TaskInfo.spec`` looks a task's up."""


@dataclass
class TaskInfo:
    """One task (or domain): what its head predicts and how it is scored."""

    name: str
    kind: TaskKind = "classification"
    num_classes: int | None = None
    ignore_index: int = -1

    @property
    def spec(self) -> KindSpec:
        """This task's kind (``TASK_KINDS``); an unknown kind is a ValueError listing the known ones."""
        try:
            return TASK_KINDS[self.kind]
        except KeyError:
            raise ValueError(f"task {self.name!r} has unknown kind {self.kind!r}; known: "
                             f"{', '.join(TASK_KINDS)}") from None

    @property
    def out_channels(self) -> int:
        """Channels the task head must output (classes for classification/segmentation, 1 depth, 3 normals)."""
        spec = self.spec
        if spec.classes:
            if not self.num_classes:
                raise ValueError(f"task {self.name!r} ({self.kind}) needs num_classes")
            return self.num_classes
        assert spec.channels is not None
        return spec.channels


class TaskDataset(Dataset):
    """Base of all mola datasets. ``__getitem__`` returns ``(x, target, task_id)``.

    - domain / multi-input: ``target`` is an int64 scalar label, ``task_id`` the sample's domain/task;
    - single-input: ``target`` is a dict task name -> target tensor, ``task_id`` is ``ALL_TASKS`` (-1).
    ``task_ids`` holds every sample's task id (for samplers and per-task counts) without loading inputs.
    """

    task_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.task_ids)

    def __getitem__(self, i: int) -> tuple[Tensor, Any, int]:
        raise NotImplementedError


def as_int64(values: Any, what: str) -> np.ndarray:
    """``values`` (array, tensor or list) as an int64 array; ValueError naming ``what`` (e.g. "task ids"), the
    first bad index and value when they are not integers (floats are accepted only when integral)."""
    arr = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{what} must be integers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            i = int(np.flatnonzero(bad.reshape(-1))[0])
            raise ValueError(f"{what} must be integers, got {arr.reshape(-1)[i]} at index {i} (dtype {arr.dtype})")
    return arr.astype(np.int64)


class ArrayTaskDataset(TaskDataset):
    """In-memory dataset: inputs (N, ...) float tensor, labels (N,) int64, task ids (N,)."""

    def __init__(self, inputs: Tensor, labels: Tensor, task_ids: Tensor | np.ndarray, transform: Any = None) -> None:
        if not (len(inputs) == len(labels) == len(task_ids)):
            raise ValueError(
                f"inputs ({len(inputs)}), labels ({len(labels)}) and task ids ({len(task_ids)}) differ in length"
            )
        self.inputs = inputs
        self.labels = torch.from_numpy(as_int64(labels, "labels"))
        self.task_ids = as_int64(task_ids, "task ids")
        self.transform = transform

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        x = self.inputs[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[i], int(self.task_ids[i])


@dataclass
class Scenario:
    """A ready-to-train heterogeneous dataset: tasks, the three splits and how the heads are shared."""

    name: str
    heterogeneity: Heterogeneity
    tasks: list[TaskInfo]
    train: TaskDataset
    val: TaskDataset
    test: TaskDataset
    input_shape: tuple[int, ...]
    shared_head: bool = False
    derived: bool = False
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    preprocessing: Any = None  # ImagePreprocessing: one image file -> input (mola predict); None: not images

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def summary(self) -> dict[str, Any]:
        def counts(ds: TaskDataset) -> list[int]:
            if self.heterogeneity == "single_input":
                return [len(ds)] * self.num_tasks
            return np.bincount(ds.task_ids, minlength=self.num_tasks).tolist()

        return {
            "name": self.name,
            "heterogeneity": self.heterogeneity,
            "tasks": [t.name for t in self.tasks],
            "input_shape": list(self.input_shape),
            "train": counts(self.train),
            "val": counts(self.val),
            "test": counts(self.test),
            "derived": self.derived,
        }
