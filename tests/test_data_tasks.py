"""The ``tasks`` layout (your own multi-task images): per-task classes and heads, colour kept, split folders,
the channel and size rules, and the messages when a folder looks like the other layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fixtures_data import make_image_tree, make_task_folders
from mola.cli.main import main
from mola.data import DataConfig, build_scenario
from mola.data.layouts.tasks import channel_rule

TINY = ["data.kind=tasks", "train.epochs=1", "data.batch_size=8", "data.eval_batch_size=16",
        "train.progress=false", "train.tensorboard=false", "model.backbone.name=small_cnn", "model.backbone.width=4"]


def test_three_rgb_tasks_keep_their_classes_and_colour(tmp_path: Path) -> None:
    root = make_task_folders(tmp_path / "mine")
    sc = build_scenario(DataConfig(kind="tasks", root=str(root)))
    assert sc.heterogeneity == "multi_input" and not sc.shared_head
    assert [(t.name, t.num_classes) for t in sc.tasks] == [("colors", 3), ("shapes", 2), ("xray", 2)]
    assert sc.input_shape == (3, 16, 16)  # colour found -> 3 channels; largest side 16
    assert sc.extra["classes"]["colors"] == ["blue", "green", "red"]
    colors = [i for i in range(len(sc.train)) if sc.train.task_ids[i] == 0]
    x, y, t = sc.train[colors[0]]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    rgb = (x * std + mean).mean(dim=(1, 2))
    assert int(rgb.argmax()) == {"blue": 2, "green": 1, "red": 0}[sc.extra["classes"]["colors"][int(y)]]
    # shapes has its own split folders: 2 per class in val and test, all 6 per class in train
    shapes = {s: int((getattr(sc, s).task_ids == 1).sum()) for s in ("train", "val", "test")}
    assert shapes == {"train": 12, "val": 4, "test": 4}
    xray = sc.train[[i for i in range(len(sc.train)) if sc.train.task_ids[i] == 2][0]][0]
    assert torch.allclose(xray[0] * 0.229 + 0.485, xray[1] * 0.224 + 0.456, atol=1e-5)  # gray replicated
    one = build_scenario(DataConfig(kind="tasks", root=str(root), tasks=["xray"], image_size=8))
    assert one.input_shape == (1, 8, 8)  # only gray images -> 1 channel


def test_three_task_folder_trains_three_heads_and_dry_run_reports_it(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    root = make_task_folders(tmp_path / "mine")
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), f"data.root={root}", *TINY, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "colors: 3 classes" in text and "shapes: 2 classes" in text and "xray: 2 classes" in text
    assert "3 channel(s): some images are in colour" in text and "12x12" in text
    assert not out.exists()
    assert main(["train", "--out", str(out), f"data.root={root}", *TINY]) == 0
    from mola.engine import load_run

    run = load_run(out, "best", torch.device("cpu"))
    heads = run.model.heads
    assert len(heads) == 3 and [h(torch.zeros(1, run.model.feature_dim)).shape[1] for h in heads] == [3, 2, 2]


def test_channel_rule_is_stated() -> None:
    assert channel_rule({"RGB": 2, "L": 3}, None, gray=False)[0] == 3
    assert channel_rule({"L": 3}, None, gray=False)[0] == 1
    assert channel_rule({"RGB": 3}, 1, gray=False)[0] == 1
    assert channel_rule({"RGB": 3}, None, gray=True)[0] == 3


def test_folder_that_looks_like_the_other_layout_is_named(tmp_path: Path) -> None:
    tasks_like = make_image_tree(tmp_path / "t", {"colors": {"red": 3, "green": 3}, "digits": {"one": 3, "two": 3}})
    with pytest.raises(ValueError, match=r"share no class.*data.kind=tasks"):
        build_scenario(DataConfig(kind="folder", root=str(tasks_like)))
    split_like = make_task_folders(tmp_path / "s")
    with pytest.raises(ValueError, match=r"split folders.*data.kind=tasks"):
        build_scenario(DataConfig(kind="folder", root=str(split_like), domains=["shapes"]))
    domains_like = make_image_tree(tmp_path / "d", {"art": {"cat": 3, "dog": 3}, "photo": {"cat": 3, "dog": 3}})
    with pytest.warns(RuntimeWarning, match=r"same classes.*data.kind folder"):
        build_scenario(DataConfig(kind="tasks", root=str(domains_like)))
    bad = tmp_path / "b"
    (bad / "t" / "val" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no 'train/'"):
        build_scenario(DataConfig(kind="tasks", root=str(bad)))
