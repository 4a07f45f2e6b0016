"""The many-task benchmark built from the shipped image sets: sizes, label spaces, seeded per-task splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures_data import shared_dir
from mola.data import build_scenario
from mola.data.config import DataConfig

ROOT = shared_dir("")


def _build(**kw: object):
    if not (ROOT / "medmnist").is_dir() or not (ROOT / "digits").is_dir():
        pytest.skip("shipped data not found")
    return build_scenario(DataConfig(kind="manytask", root=str(ROOT), **kw))


def test_manytask_subset_sizes_labels_and_pixels() -> None:
    s = _build(tasks=["breast", "usps", "retina"])
    assert [t.name for t in s.tasks] == ["breast", "usps", "retina"]
    assert [t.num_classes for t in s.tasks] == [2, 10, 5]
    assert s.heterogeneity == "multi_input" and not s.shared_head and s.input_shape == (3, 28, 28)
    summary = s.summary()
    assert summary["train"] == [100, 250, 300] and summary["val"] == [78, 100, 100]
    assert summary["test"] == [156, 1000, 400]
    for ds in (s.train, s.val, s.test):
        x = ds.inputs
        assert x.dtype == torch.float32 and float(x.min()) >= -1.0 and float(x.max()) <= 1.0
        for k, t in enumerate(s.tasks):
            labels = ds.labels.numpy()[ds.task_ids == k]
            assert labels.min() >= 0 and labels.max() < t.num_classes
    # usps (16 px in [0, 1] upsampled to 28) uses the full range after (x - 0.5) / 0.5
    usps = s.train.inputs[torch.from_numpy(s.train.task_ids == 1)]
    assert float(usps.min()) < -0.9 and float(usps.max()) > 0.9
    # gray tasks are replicated to three identical channels
    breast = s.train.inputs[torch.from_numpy(s.train.task_ids == 0)]
    assert torch.equal(breast[:, 0], breast[:, 2])


def test_manytask_split_of_a_task_ignores_the_others_and_follows_split_seed() -> None:
    both = _build(tasks=["derma", "breast"])
    alone = _build(tasks=["derma"])
    d_both = both.train.inputs[torch.from_numpy(both.train.task_ids == 0)]
    assert torch.equal(d_both, alone.train.inputs)
    other = _build(tasks=["derma"], split_seed=1)
    assert other.train.inputs.shape == alone.train.inputs.shape
    assert not torch.equal(other.train.inputs, alone.train.inputs)
    # derma is re-split from one pool: no image is in two splits
    flat = {split: {bytes(x.numpy().tobytes()) for x in getattr(alone, split).inputs} for split in ("train", "test")}
    assert not flat["train"] & flat["test"]
    capped = _build(tasks=["derma"], max_per_task=50, max_eval_per_task=20)
    assert capped.summary()["train"] == [50] and capped.summary()["val"] == [20]
    with pytest.raises(ValueError, match="unknown manytask task 'cifar'"):
        _build(tasks=["cifar"])


def test_manytask_is_imbalanced_with_a_small_task() -> None:
    from mola.data.layouts.manytask import TASKS

    sizes = np.array([size for _, _, size in TASKS.values()])
    assert len(TASKS) >= 8 and sizes.max() / sizes.min() >= 10
    assert 0.02 < sizes.min() / sizes.sum() < 0.04  # one task is about 3% of the training images
