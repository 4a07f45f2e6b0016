"""The ``nyuv2`` dense multi-task layout on generated .npy trees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures_data import make_nyuv2, truncate
from mola.data import ALL_TASKS, DataConfig, build_scenario


def cfg(root, **kw) -> DataConfig:
    return DataConfig(kind="nyuv2", root=str(root), **kw)


def test_nyuv2_items_and_splits(tmp_path):
    root = make_nyuv2(tmp_path / "nyu", n_train=12, n_val=4)
    sc = build_scenario(cfg(root, val_fraction=0.25))
    assert sc.heterogeneity == "single_input"
    assert [(t.name, t.kind, t.out_channels) for t in sc.tasks] == [
        ("segmentation", "segmentation", 13), ("depth", "depth", 1), ("normal", "normal", 3)]
    assert sc.tasks[0].ignore_index == -1
    assert (len(sc.train), len(sc.val), len(sc.test)) == (9, 3, 4)
    assert sc.input_shape == (3, 8, 12)
    assert set(sc.train.names) | set(sc.val.names) == {str(i) for i in range(12)}
    assert sc.test.names == ["0", "1", "2", "3"]  # source val -> test, numeric order
    x, y, t = sc.test[1]
    assert t == ALL_TASKS and x.shape == (3, 8, 12) and x.dtype == torch.float32
    assert y["segmentation"].dtype == torch.int64 and y["segmentation"].shape == (8, 12)
    expected = np.load(root / "val" / "label" / "1.npy")
    assert torch.equal(y["segmentation"], torch.from_numpy(expected.astype(np.int64)))
    assert y["depth"].shape == (1, 8, 12) and y["normal"].shape == (3, 8, 12)
    assert int(y["segmentation"].min()) >= -1 and int(y["segmentation"].max()) <= 12
    assert build_scenario(cfg(root, val_fraction=0.25)).val.names == sc.val.names
    assert build_scenario(cfg(root, val_fraction=0.25, split_seed=4)).val.names != sc.val.names
    sub = build_scenario(cfg(root, tasks=["depth"], max_per_task=2, max_eval_per_task=1))
    assert [t.name for t in sub.tasks] == ["depth"] and list(sub.train[0][1]) == ["depth"]
    assert (len(sub.train), len(sub.test)) == (2, 1)


def test_nyuv2_layout_errors(tmp_path):
    root = make_nyuv2(tmp_path / "nyu", n_train=4, n_val=2)
    (root / "train" / "depth" / "3.npy").unlink()
    with pytest.raises(ValueError, match=r"file lists differ.*train/image.*train/depth.*only in image: \['3'\]"):
        build_scenario(cfg(root))
    for f in (root / "val" / "normal").iterdir():
        f.unlink()
    (root / "val" / "normal").rmdir()
    with pytest.raises(FileNotFoundError, match=r"(?s)val/normal.*does not exist.*normal/"):
        build_scenario(cfg(root, tasks=["normal"]))
    with pytest.raises(ValueError, match="unknown NYUv2 task"):
        build_scenario(cfg(root, tasks=["edges"]))


def test_nyuv2_corrupt_npy(tmp_path):
    root = make_nyuv2(tmp_path / "nyu", n_train=4, n_val=2)
    truncate(root / "val" / "depth" / "0.npy", 60)
    sc = build_scenario(cfg(root))
    with pytest.raises(ValueError, match=r"cannot read npy file .*val/depth/0\.npy"):
        sc.test[0]
