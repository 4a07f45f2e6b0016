"""DataConfig: which on-disk layout to read, where, and how to split, resize and sample it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DataConfig:
    """``kind`` names a registered layout (``mola list`` shows them); the rest say how to read and split it."""

    kind: str = "medmnist"  # on-disk layout: digits, folder, medmnist, multidigit, nyuv2, office_caltech10, ...
    root: str = "../shared/data/medmnist"  # data folder (a relative path is relative to the working directory)
    domains: list[str] | None = None  # domains to use (domain layouts); null: every domain found
    tasks: list[str] | None = None  # tasks to use (task layouts); null: every task found
    image_size: int | None = None  # resize images to this size (square); null: the layout's default
    channels: int | None = None  # input channels (gray replicated to 3, RGB to luminance for 1); null: layout default
    feature: str = "surf"  # office_caltech10 feature set: surf or decaf6
    val_fraction: float = 0.1  # share of each task held out for val where the source has no val split
    test_fraction: float = 0.2  # share of each task held out for test where the source has no test split
    split_seed: int = 0  # seed of the train/val/test splits and of the max_* subsets (not train.seed)
    max_per_task: int | None = None  # cap on training samples per task (seeded subset); null: all
    max_eval_per_task: int | None = None  # cap on val and on test samples per task; null: all
    batch_size: int = 128  # training batch size (all tasks together; under torchrun the global batch of all ranks)
    eval_batch_size: int = 256  # val/test batch size
    num_workers: int = 0  # DataLoader worker processes
    sampling: Literal["mixed", "balanced"] = "mixed"  # mixed: shuffle all tasks together; balanced: same share per task
    #: train augmentation of the image-folder layouts (folder, vlcs, office_home, radimagenet): true: DomainBed's;
    #: paper: the paper's (RandomResizedCrop scale 0.7-1 bicubic, flip, ColorJitter 0.4, 10% gray; eval: Resize
    #: + CenterCrop)
    augment: bool | Literal["paper"] = False
    shift: float = 0.0  # shifted_digits: share (0..1) of pixels each domain scrambles (the conflict knob)
