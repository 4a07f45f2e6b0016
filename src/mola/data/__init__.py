"""Datasets and scenarios: the TaskDataset contract, loaders per on-disk layout, splits and samplers."""

from mola.data.base import ALL_TASKS, ArrayTaskDataset, Scenario, TaskDataset, TaskInfo
from mola.data.config import DataConfig
from mola.data.registry import SCENARIOS, build_scenario

__all__ = ["ALL_TASKS", "ArrayTaskDataset", "DataConfig", "SCENARIOS", "Scenario", "TaskDataset", "TaskInfo",
           "build_scenario"]
