"""make_loaders: mixed / balanced train sampling, seeded and resumable order, ordered eval, dict collate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures_data import make_nyuv2
from mola.data import (
    ArrayTaskDataset,
    BalancedBatchSampler,
    DataConfig,
    Scenario,
    TaskInfo,
    build_scenario,
    make_loaders,
    set_loader_epoch,
)

SIZES = (300, 60, 40)  # deliberately unbalanced tasks


def toy(sizes=SIZES) -> Scenario:
    def ds(scale: int) -> ArrayTaskDataset:
        ns = [max(1, n // scale) for n in sizes]
        tid = np.repeat(np.arange(len(ns)), ns)
        x = torch.arange(len(tid), dtype=torch.float32).unsqueeze(1)
        return ArrayTaskDataset(x, torch.zeros(len(tid), dtype=torch.long), tid)

    return Scenario("toy", "multi_input", [TaskInfo(f"t{i}", num_classes=2) for i in range(len(sizes))],
                    ds(1), ds(4), ds(4), input_shape=(1,))


def order(loader) -> list[int]:
    return [int(v) for x, _, _ in loader for v in x[:, 0]]


def test_balanced_batches_have_each_task_equally():
    sc = toy()
    cfg = DataConfig(batch_size=30, sampling="balanced")
    train = make_loaders(sc, cfg, seed=0)["train"]
    assert isinstance(train.batch_sampler, BalancedBatchSampler)
    assert len(train) == sum(SIZES) // 30
    for _, _, tid in train:
        assert len(tid) == 30
        assert torch.bincount(tid, minlength=3).tolist() == [10, 10, 10]
    cfg = DataConfig(batch_size=32, sampling="balanced")
    for _, _, tid in make_loaders(sc, cfg, seed=0)["train"]:
        counts = torch.bincount(tid, minlength=3)
        assert counts.sum() == 32 and counts.min() >= 10 and counts.max() <= 11


def test_balanced_covers_small_tasks_without_repeats_within_a_cycle():
    sampler = BalancedBatchSampler(np.repeat([0, 1], [100, 10]), batch_size=20, seed=3)
    batches = list(sampler)
    small = [i for b in batches for i in b if i >= 100]
    assert len(small) == 50 and set(small) == set(range(100, 110))
    assert all(len(set(small[k:k + 10])) == 10 for k in range(0, 50, 10))


@pytest.mark.parametrize("sampling", ["mixed", "balanced"])
def test_same_seed_same_order_and_epochs_differ(sampling):
    sc = toy()
    cfg = DataConfig(batch_size=16, sampling=sampling)
    a, b = make_loaders(sc, cfg, seed=7)["train"], make_loaders(sc, cfg, seed=7)["train"]
    a0, b0 = order(a), order(b)
    assert a0 == b0
    a1 = order(a)  # the next pass is the next epoch
    assert a1 != a0
    set_loader_epoch(b, 1)
    assert order(b) == a1  # resuming at epoch 1 reproduces it
    set_loader_epoch(b, 0)
    assert order(b) == a0
    assert order(make_loaders(sc, cfg, seed=8)["train"]) != a0
    sampler = a.batch_sampler if sampling == "balanced" else a.sampler
    state = sampler.state_dict()
    nxt = order(a)
    sampler.load_state_dict(state)
    assert order(a) == nxt


def test_mixed_is_a_permutation_and_eval_is_ordered():
    sc = toy()
    loaders = make_loaders(sc, DataConfig(batch_size=25, eval_batch_size=7), seed=0)
    seen = order(loaders["train"])
    assert len(seen) == (sum(SIZES) // 25) * 25 and len(set(seen)) == len(seen)
    assert seen != sorted(seen)
    assert order(loaders["val"]) == list(range(len(sc.val)))
    assert len(next(iter(loaders["test"]))[0]) == 7
    tiny = toy((3, 2, 1))
    assert len(order(make_loaders(tiny, DataConfig(batch_size=64), seed=0)["train"])) == 6


def test_dict_targets_collate_and_single_input_balanced_falls_back(tmp_path):
    sc = build_scenario(DataConfig(kind="nyuv2", root=str(make_nyuv2(tmp_path / "nyu", 9, 3))))
    loaders = make_loaders(sc, DataConfig(batch_size=4, eval_batch_size=3, sampling="balanced"), seed=0)
    x, y, tid = next(iter(loaders["train"]))
    assert x.shape == (4, 3, 8, 12) and tid.tolist() == [-1] * 4
    assert y["segmentation"].shape == (4, 8, 12) and y["segmentation"].dtype == torch.int64
    assert y["depth"].shape == (4, 1, 8, 12) and y["normal"].shape == (4, 3, 8, 12)
    x, y, _ = next(iter(loaders["test"]))
    assert x.shape == (3, 3, 8, 12)


def test_bad_sampling_is_rejected():
    with pytest.raises(ValueError, match="unknown data.sampling 'uniform'.*mixed, balanced"):
        make_loaders(toy(), DataConfig(sampling="uniform"), seed=0)  # type: ignore[arg-type]


@pytest.mark.parametrize("workers", [0, 1])
def test_eval_loaders_leave_the_global_rng_alone(workers):
    """Iterating val/test must not draw from torch's global RNG (a DataLoader iterator takes its base seed from
    it unless the loader has a generator): otherwise evaluating changes the next epoch's dropout masks."""
    loaders = make_loaders(toy(), DataConfig(batch_size=8, eval_batch_size=8, num_workers=workers), seed=0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for split in ("val", "test"):
        assert len(order(loaders[split])) > 0
    assert torch.equal(torch.get_rng_state(), before)
