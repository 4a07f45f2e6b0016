"""The ``medmnist`` layout on generated npz files / npy folders, plus the shipped MedMNIST files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures_data import make_npz, make_val_only_folder, shared_dir, truncate
from mola.data import DataConfig, build_scenario
from mola.data.layouts._common import split_sizes


def make_root(tmp_path):
    root = tmp_path / "medmnist"
    make_npz(root / "breastmnist.npz", (20, 6, 8), 2, flat_labels=True, seed=1)
    make_npz(root / "retinamnist.npz", (30, 5, 10), 5, rgb=True, seed=2)
    make_val_only_folder(root / "dermamnist_val_only", 40, 7)
    return root


def cfg(root, **kw) -> DataConfig:
    return DataConfig(kind="medmnist", root=str(root), **kw)


def test_medmnist_tasks_shapes_and_counts(tmp_path):
    sc = build_scenario(cfg(make_root(tmp_path)))
    assert sc.heterogeneity == "multi_input" and not sc.shared_head
    assert [(t.name, t.num_classes) for t in sc.tasks] == [("breast", 2), ("derma", 7), ("retina", 5)]
    assert sc.input_shape == (3, 28, 28)
    s = sc.summary()
    d_tr, d_va, d_te = split_sizes(40, 0.1, 0.2)
    assert s["train"] == [20, d_tr, 30] and s["val"] == [6, d_va, 5] and s["test"] == [8, d_te, 10]
    assert "derma" in sc.notes and "re-split" in sc.notes
    x, y, t = sc.train[0]
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64 and t == 0
    assert torch.equal(x[0], x[2])  # gray breast replicated to 3 channels
    assert float(sc.train.inputs.min()) >= -1.0 and float(sc.train.inputs.max()) <= 1.0
    retina = sc.test.labels[torch.from_numpy(sc.test.task_ids == 2)]
    assert retina.tolist() == [i % 5 for i in range(10)]  # (N,1) labels flattened, order kept


def test_medmnist_selection_channels_resize_and_determinism(tmp_path):
    root = make_root(tmp_path)
    sc = build_scenario(cfg(root, tasks=["retina", "breastmnist"], channels=1, image_size=32))
    assert [t.name for t in sc.tasks] == ["retina", "breast"]
    assert sc.input_shape == (1, 32, 32) and sc.train[0][0].shape == (1, 32, 32)
    assert sc.train.inputs.shape[1:] == (1, 28, 28)  # resized lazily
    a = build_scenario(cfg(root, tasks=["derma"]))
    b = build_scenario(cfg(root, tasks=["derma"]))
    c = build_scenario(cfg(root, tasks=["derma"], split_seed=3))
    assert torch.equal(a.test.inputs, b.test.inputs)
    assert not torch.equal(a.test.inputs, c.test.inputs)
    capped = build_scenario(cfg(root, max_per_task=4, max_eval_per_task=2))
    assert capped.summary()["train"] == [4, 4, 4] and capped.summary()["test"] == [2, 2, 2]
    with pytest.raises(ValueError, match="unknown medmnist task 'chest'.*retinamnist"):
        build_scenario(cfg(root, tasks=["chest"]))


def test_medmnist_missing_key_and_corrupt_file(tmp_path):
    root = tmp_path / "m"
    make_npz(root / "octmnist.npz", (5, 2, 2), 4, drop=("test_images",))
    with pytest.raises(ValueError, match=r"octmnist\.npz.*no key 'test_images'.*split 'test' missing"):
        build_scenario(cfg(root))
    bad = make_npz(tmp_path / "c" / "pathmnist.npz", (5, 2, 2), 9)
    truncate(bad, 200)
    with pytest.raises(ValueError, match=r"pathmnist\.npz"):
        build_scenario(cfg(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match=r"nowhere.*does not exist"):
        build_scenario(cfg(tmp_path / "nowhere"))
    (tmp_path / "e").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no MedMNIST \.npz file"):
        build_scenario(cfg(tmp_path / "e"))


def test_medmnist_npy_folder_missing_labels(tmp_path):
    folder = make_val_only_folder(tmp_path / "m" / "dermamnist_x", 10, 7)
    (folder / "val_labels.npy").unlink()
    with pytest.raises(ValueError, match=r"val_images\.npy.*no matching labels file"):
        build_scenario(cfg(tmp_path / "m"))


def test_medmnist_shipped():
    root = shared_dir("medmnist")
    if not root.is_dir():
        pytest.skip("shipped medmnist data absent")
    sc = build_scenario(cfg(root))
    s = sc.summary()
    assert s["tasks"] == ["breast", "derma", "pneumonia", "retina"]
    assert [t.num_classes for t in sc.tasks] == [2, 7, 2, 5]
    assert s["train"] == [546, 702, 3882, 1080]
    assert s["val"] == [78, 100, 524, 120]
    assert s["test"] == [156, 201, 624, 400]
    assert sc.input_shape == (3, 28, 28)
    retina_train = sc.train.labels[torch.from_numpy(sc.train.task_ids == 3)]
    assert np.bincount(retina_train.numpy()).tolist() == [486, 128, 206, 194, 66]
    derma = torch.cat([d.labels[torch.from_numpy(d.task_ids == 1)] for d in (sc.train, sc.val, sc.test)])
    assert np.bincount(derma.numpy()).tolist() == [33, 52, 110, 12, 111, 671, 14]
