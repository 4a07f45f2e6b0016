"""DataConfig: which on-disk layout to read, where, and how to split, resize and sample it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DataConfig:
    """``kind`` names a registered layout (``mola list`` shows them); the rest say how to read and split it."""

    kind: str = "medmnist"
    root: str = "../shared/data/medmnist"
    domains: list[str] | None = None
    tasks: list[str] | None = None
    image_size: int | None = None
    channels: int | None = None
    feature: str = "surf"
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    max_per_task: int | None = None
    max_eval_per_task: int | None = None
    batch_size: int = 128
    eval_batch_size: int = 256
    num_workers: int = 0
    sampling: Literal["mixed", "balanced"] = "mixed"
    augment: bool = False
