"""The data contract (TaskInfo, Scenario, TaskDataset, ...): defined in ``mola.tasks``, re-exported here."""

from mola.tasks import (
    ALL_TASKS,
    ArrayTaskDataset,
    Heterogeneity,
    Scenario,
    TaskDataset,
    TaskInfo,
    TaskKind,
    as_int64,
)

__all__ = ["ALL_TASKS", "ArrayTaskDataset", "Heterogeneity", "Scenario", "TaskDataset", "TaskInfo", "TaskKind",
           "as_int64"]
