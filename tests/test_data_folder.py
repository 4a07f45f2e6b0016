"""The ``folder`` (DomainBed) and ``radimagenet`` image-folder layouts, on generated PNG trees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures_data import make_image_tree, truncate, write_png
from mola.data import DataConfig, build_scenario
from mola.data.layouts._common import split_sizes, stratified_split

GROUPS = {
    "art": {"cat": 6, "dog": 5, "horse": 4},
    "photo": {"cat": 10, "dog": 10},  # no horse: the label space is the union
}


def cfg(root, **kw) -> DataConfig:
    return DataConfig(kind=kw.pop("kind", "folder"), root=str(root), image_size=kw.pop("image_size", 24), **kw)


def test_folder_builds_domains_with_shared_label_space(tmp_path):
    sc = build_scenario(cfg(make_image_tree(tmp_path / "pacs", GROUPS)))
    assert sc.heterogeneity == "domain" and sc.shared_head
    assert [t.name for t in sc.tasks] == ["art", "photo"]
    assert all(t.num_classes == 3 for t in sc.tasks)
    assert sc.extra["classes"] == ["cat", "dog", "horse"]
    assert sc.input_shape == (3, 24, 24)
    for d, n in (("art", 15), ("photo", 20)):
        t = [t.name for t in sc.tasks].index(d)
        sizes = tuple(int((ds.task_ids == t).sum()) for ds in (sc.train, sc.val, sc.test))
        assert sizes == split_sizes(n, 0.1, 0.2)
    x, y, t = sc.train[0]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and 0 <= int(y) < 3 and t in (0, 1)
    assert "horse" in sc.notes  # classes absent from a domain are reported
    photo_labels = sc.train.labels[sc.train.task_ids == 1]
    assert set(photo_labels.tolist()) <= {0, 1}


def test_folder_split_is_seeded_and_disjoint(tmp_path):
    root = make_image_tree(tmp_path / "vlcs", GROUPS)
    a, b = build_scenario(cfg(root)), build_scenario(cfg(root))
    c = build_scenario(cfg(root, split_seed=1))
    assert a.train.paths == b.train.paths and a.test.paths == b.test.paths
    assert a.test.paths != c.test.paths
    all_paths = a.train.paths + a.val.paths + a.test.paths
    assert len(set(all_paths)) == len(all_paths) == 35


def test_stratified_split_keeps_class_shares():
    labels = np.repeat(np.arange(4), [40, 30, 20, 10])
    tr, va, te = stratified_split(labels, 0.1, 0.2, np.random.default_rng(0))
    assert (len(tr), len(va), len(te)) == split_sizes(100, 0.1, 0.2)
    assert np.bincount(labels[te], minlength=4).tolist() == [8, 6, 4, 2]
    assert len(set(tr) | set(va) | set(te)) == 100


def test_folder_domain_selection_and_caps(tmp_path):
    root = make_image_tree(tmp_path / "d", GROUPS)
    sc = build_scenario(cfg(root, domains=["photo"], max_per_task=5, max_eval_per_task=1))
    assert [t.name for t in sc.tasks] == ["photo"]
    assert (len(sc.train), len(sc.val), len(sc.test)) == (5, 1, 1)
    with pytest.raises(ValueError, match="unknown domain 'sketch'.*available: art, photo"):
        build_scenario(cfg(root, domains=["sketch"]))


def test_folder_augment_and_gray(tmp_path):
    root = make_image_tree(tmp_path / "d", GROUPS)
    sc = build_scenario(cfg(root, augment=True, channels=1, image_size=16))
    assert sc.train[0][0].shape == (1, 16, 16) and sc.test[0][0].shape == (1, 16, 16)
    assert sc.train.transform.augment and not sc.test.transform.augment


def test_folder_corrupt_image_names_file(tmp_path):
    root = make_image_tree(tmp_path / "d", {"art": {"cat": 3}})
    bad = root / "art" / "cat" / "001.png"
    truncate(bad)
    with pytest.raises(ValueError, match=r"cannot read image file .*001\.png"):  # when the layout is read
        build_scenario(cfg(root, val_fraction=0.0, test_fraction=0.0))


def test_folder_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)missing.*does not exist.*<domain>/"):
        build_scenario(cfg(tmp_path / "missing"))
    flat = tmp_path / "flat"
    write_png(flat / "art" / "0.png", np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"(?s)flat/art.*no class sub-folders.*<class> level is missing"):
        build_scenario(cfg(flat))
    empty = tmp_path / "empty"
    (empty / "art" / "cat").mkdir(parents=True)
    (empty / "art" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"empty/art.*no image files"):
        build_scenario(cfg(empty))
    (tmp_path / "nodomains").mkdir()
    with pytest.raises(ValueError, match=r"nodomains.*no domain sub-folders"):
        build_scenario(cfg(tmp_path / "nodomains"))


def test_radimagenet_tasks_have_own_label_spaces(tmp_path):
    groups = {"CT-abdomen": {"normal": 6, "cyst": 5, "stone": 4}, "MR-knee": {"normal": 8, "tear": 7}}
    root = make_image_tree(tmp_path / "rad", groups, mode="L")
    sc = build_scenario(cfg(root, kind="radimagenet", image_size=16))
    assert sc.heterogeneity == "multi_input" and not sc.shared_head
    assert [(t.name, t.num_classes) for t in sc.tasks] == [("CT-abdomen", 3), ("MR-knee", 2)]
    assert sc.extra["classes"]["MR-knee"] == ["normal", "tear"]
    x, y, t = sc.train[0]
    assert x.shape == (3, 16, 16)
    assert torch.allclose(x[0] * 0.229 + 0.485, x[1] * 0.224 + 0.456, atol=1e-5)  # gray replicated
    assert sum(len(d) for d in (sc.train, sc.val, sc.test)) == 30
    mr = sc.train.labels[sc.train.task_ids == 1]
    assert set(mr.tolist()) <= {0, 1}
    one = build_scenario(cfg(root, kind="radimagenet", image_size=16, channels=1, tasks=["MR-knee"]))
    assert one.input_shape == (1, 16, 16) and one.train[0][0].shape == (1, 16, 16)
    with pytest.raises(ValueError, match="unknown task 'XR-chest'"):
        build_scenario(cfg(root, kind="radimagenet", tasks=["XR-chest"]))
