"""Datasets and scenarios: the TaskDataset contract, loaders per on-disk layout, splits and samplers."""

from mola.data.config import DataConfig
from mola.data.layouts._common import ArrayMultiTargetDataset, ImageFileDataset
from mola.data.loaders import BalancedBatchSampler, EpochRandomSampler, make_loaders, set_loader_epoch
from mola.data.registry import SCENARIOS, build_scenario
from mola.tasks import ALL_TASKS, ArrayTaskDataset, Scenario, TaskDataset, TaskInfo

__all__ = ["ALL_TASKS", "ArrayMultiTargetDataset", "ArrayTaskDataset", "BalancedBatchSampler", "DataConfig",
           "EpochRandomSampler", "ImageFileDataset", "SCENARIOS", "Scenario", "TaskDataset", "TaskInfo",
           "build_scenario", "make_loaders", "set_loader_epoch"]
