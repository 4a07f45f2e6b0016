"""The ``office_caltech10`` feature layout on generated .mat files, plus the shipped SURF/DeCAF6 files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures_data import make_office, shared_dir, truncate
from mola.data import DataConfig, build_scenario
from mola.data.layouts._common import split_sizes

COUNTS = {"amazon": 40, "caltech": 50, "dslr": 20, "webcam": 30}


def cfg(root, **kw) -> DataConfig:
    return DataConfig(kind="office_caltech10", root=str(root), **kw)


def test_surf_domains_labels_and_normalisation(tmp_path):
    root = make_office(tmp_path, "surf", COUNTS)
    sc = build_scenario(cfg(root))
    assert [t.name for t in sc.tasks] == list(COUNTS) and sc.shared_head
    assert sc.input_shape == (800,) and all(t.num_classes == 10 for t in sc.tasks)
    s = sc.summary()
    for i, n in enumerate(COUNTS.values()):
        assert (s["train"][i], s["val"][i], s["test"][i]) == split_sizes(n, 0.1, 0.2)
    x, y, t = sc.train[0]
    assert x.shape == (800,) and x.dtype == torch.float32 and y.dtype == torch.int64
    all_labels = torch.cat([sc.train.labels, sc.val.labels, sc.test.labels])
    assert int(all_labels.min()) == 0 and int(all_labels.max()) == 9
    assert sc.train.inputs.mean(0).abs().max() < 1e-4  # z-scored with train statistics
    assert abs(float(sc.train.inputs.std(0, unbiased=False).mean()) - 1.0) < 1e-3
    again = build_scenario(cfg(root))
    assert torch.equal(again.test.inputs, sc.test.inputs)


def test_decaf6_uses_available_domains(tmp_path):
    root = make_office(tmp_path, "decaf6", {"dslr": 20, "webcam": 30})
    sc = build_scenario(cfg(root, feature="decaf6"))
    assert [t.name for t in sc.tasks] == ["dslr", "webcam"] and sc.input_shape == (4096,)
    assert sc.train[0][0].shape == (4096,)


def test_office_errors(tmp_path):
    root = make_office(tmp_path, "decaf6", {"dslr": 10})
    with pytest.raises(FileNotFoundError, match=r"decaf6/amazon\.mat"):
        build_scenario(cfg(root, feature="decaf6", domains=["amazon"]))
    with pytest.raises(ValueError, match="unknown office_caltech10 feature 'sift'.*surf, decaf6"):
        build_scenario(cfg(root, feature="sift"))
    with pytest.raises(ValueError, match="unknown office_caltech10 domain"):
        build_scenario(cfg(root, feature="decaf6", domains=["clipart"]))
    with pytest.raises(FileNotFoundError, match=r"surf.*does not exist"):
        build_scenario(cfg(root, feature="surf"))
    truncate(root / "decaf6" / "dslr.mat", 300)
    with pytest.raises(ValueError, match=r"cannot read \.mat file .*dslr\.mat"):
        build_scenario(cfg(root, feature="decaf6"))


def test_office_missing_key(tmp_path):
    import scipy.io

    (tmp_path / "surf").mkdir()
    scipy.io.savemat(tmp_path / "surf" / "dslr_SURF_L10.mat", {"X": np.zeros((3, 800)), "labels": np.ones((3, 1))})
    with pytest.raises(ValueError, match=r"dslr_SURF_L10\.mat.*no key 'fts'"):
        build_scenario(cfg(tmp_path))


def test_office_shipped():
    root = shared_dir("office_caltech10")
    if not root.is_dir():
        pytest.skip("shipped office_caltech10 data absent")
    sc = build_scenario(cfg(root))
    totals = [a + b + c for a, b, c in zip(*(sc.summary()[s] for s in ("train", "val", "test")), strict=True)]
    assert [t.name for t in sc.tasks] == ["amazon", "caltech", "dslr", "webcam"]
    assert totals == [958, 1123, 157, 295]
    assert sc.summary()["train"] == [split_sizes(n, 0.1, 0.2)[0] for n in totals]
    dec = build_scenario(cfg(root, feature="decaf6"))
    assert [t.name for t in dec.tasks] == ["dslr", "webcam"] and dec.input_shape == (4096,)
    assert sum(len(d) for d in (dec.train, dec.val, dec.test)) == 157 + 295
