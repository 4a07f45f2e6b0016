"""The ``digits`` and derived ``multidigit`` layouts on generated csv.gz / IDX / h5 files and the shipped data."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from fixtures_data import make_digits, shared_dir, truncate
from mola.data import ALL_TASKS, DataConfig, build_scenario
from mola.data.layouts._common import read_idx


def cfg(root, kind="digits", **kw) -> DataConfig:
    return DataConfig(kind=kind, root=str(root), **kw)


def test_digits_domains_shapes_and_splits(tmp_path):
    root = make_digits(tmp_path / "digits")
    sc = build_scenario(cfg(root))
    assert [t.name for t in sc.tasks] == ["mnist", "usps"] and sc.shared_head
    assert sc.input_shape == (1, 28, 28)
    s = sc.summary()
    assert s["train"] == [54, 45] and s["val"] == [6, 5] and s["test"] == [30, 20]
    x, y, t = sc.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(float(sc.train.inputs.mean())) < 1e-4 and abs(float(sc.train.inputs.std()) - 1) < 1e-3
    usps = sc.test.labels[torch.from_numpy(sc.test.task_ids == 1)]
    assert usps.tolist() == [i % 10 for i in range(20)]
    again = build_scenario(cfg(root))
    assert torch.equal(again.val.inputs, sc.val.inputs)
    other = build_scenario(cfg(root, split_seed=5))
    assert not torch.equal(other.val.inputs, sc.val.inputs)


def test_digits_subset_caps_resize_channels(tmp_path):
    root = make_digits(tmp_path / "digits")
    sc = build_scenario(cfg(root, domains=["usps"], max_per_task=7, max_eval_per_task=3, image_size=32, channels=3))
    assert [t.name for t in sc.tasks] == ["usps"]
    assert (len(sc.train), len(sc.val), len(sc.test)) == (7, 3, 3)
    assert sc.input_shape == (3, 32, 32) and sc.train[0][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="unknown digits domain 'svhn'.*mnist, usps"):
        build_scenario(cfg(root, domains=["svhn"]))


def test_digits_file_errors(tmp_path):
    root = make_digits(tmp_path / "digits")
    idx = root / "mnist_test" / "t10k-images-idx3-ubyte.gz"
    truncate(idx, 30)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz"):
        build_scenario(cfg(root, domains=["mnist"]))
    with gzip.open(idx, "wb") as f:  # valid gzip, data shorter than the header says
        f.write(bytes([0, 0, 8, 3]) + (5).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 100)
    with pytest.raises(ValueError, match=r"t10k-images.*data bytes"):
        read_idx(idx)
    (root / "usps" / "usps.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match=r"cannot read HDF5 file .*usps\.h5"):
        build_scenario(cfg(root, domains=["usps"]))
    (root / "mnist_5k" / "mnist_5k.csv.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"mnist_5k\.csv\.gz"):
        build_scenario(cfg(root, domains=["mnist"]))


def test_usps_missing_split(tmp_path):
    import h5py

    root = make_digits(tmp_path / "digits")
    with h5py.File(root / "usps" / "usps.h5", "a") as h:
        del h["test"]
    with pytest.raises(ValueError, match=r"usps\.h5.*no test/data"):
        build_scenario(cfg(root, domains=["usps"]))


def test_multidigit_composites(tmp_path):
    root = make_digits(tmp_path / "digits")
    sc = build_scenario(cfg(root, kind="multidigit"))
    assert sc.derived and sc.heterogeneity == "single_input" and "DERIVED" in sc.notes
    assert [(t.name, t.kind, t.num_classes) for t in sc.tasks] == [
        ("left", "classification", 10), ("right", "classification", 10), ("segmentation", "segmentation", 3)]
    assert (len(sc.train), len(sc.val), len(sc.test)) == (54, 6, 30)
    assert sc.input_shape == (1, 28, 56)
    x, y, t = sc.train[3]
    assert t == ALL_TASKS and x.shape == (1, 28, 56)
    assert y["left"].dtype == torch.int64 and y["left"].shape == ()
    seg = y["segmentation"]
    assert seg.shape == (28, 56) and seg.dtype == torch.int64
    assert set(seg[:, :28].unique().tolist()) <= {0, 1} and set(seg[:, 28:].unique().tolist()) <= {0, 2}
    # the fake digits are a bar whose column encodes the label: check the pairing labels match the pixels
    for half, key in ((slice(0, 28), "left"), (slice(28, 56), "right")):
        col = int(np.flatnonzero((seg[:, half] > 0).any(0).numpy())[0])
        assert col == 2 + int(y[key]) * 22 // 10
    raw = x * 0.3081 + 0.1307
    assert torch.equal(seg > 0, raw[0] > 0.5)
    capped = build_scenario(cfg(root, kind="multidigit", max_per_task=10, max_eval_per_task=4, tasks=["left"]))
    assert (len(capped.train), len(capped.test)) == (10, 4) and list(capped.train[0][1]) == ["left"]
    again = build_scenario(cfg(root, kind="multidigit"))
    assert torch.equal(again.train.targets["right"], sc.train.targets["right"])


def test_digits_shipped():
    root = shared_dir("digits")
    if not root.is_dir():
        pytest.skip("shipped digits data absent")
    sc = build_scenario(cfg(root))
    s = sc.summary()
    assert s["train"] == [4500, 6562] and s["val"] == [500, 729] and s["test"] == [10000, 2007]
    mnist_test = sc.test.labels[torch.from_numpy(sc.test.task_ids == 0)]
    assert np.bincount(mnist_test.numpy()).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    md = build_scenario(cfg(root, kind="multidigit", max_eval_per_task=1000))
    assert (len(md.train), len(md.val), len(md.test)) == (4500, 500, 1000)
    x, y, _ = md.train[0]
    assert x.shape == (1, 28, 56) and y["segmentation"].shape == (28, 56)
