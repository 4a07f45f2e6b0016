"""Tests of mola.metrics against hand-computed cases and sklearn."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from mola.data.base import TaskInfo
from mola.metrics import (
    HIGHER_IS_BETTER,
    abs_err,
    accuracy,
    auc,
    binary_auc,
    confusion_matrix,
    delta_m,
    delta_p,
    iou_per_class,
    make_meter,
    mean_over_tasks,
    miou,
    normal_angle_errors,
    normal_metrics,
    pixel_accuracy,
    primary_metric,
    rel_err,
)

# --- classification -------------------------------------------------------------------------------------


def test_accuracy_logits_and_labels() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [4.0, 0.0, 0.0]])
    target = torch.tensor([0, 1, 1, 2])
    assert accuracy(logits, target) == pytest.approx(0.5)
    assert accuracy(torch.tensor([0, 1, 2, 1]), target) == pytest.approx(0.5)


def test_binary_auc_hand_case_with_tie() -> None:
    # positives 0.8, 0.4; negatives 0.4, 0.1.
    # Pairs: (0.8>0.4)=1, (0.8>0.1)=1, (0.4=0.4)=0.5, (0.4>0.1)=1 -> 3.5/4
    scores = torch.tensor([0.8, 0.4, 0.4, 0.1])
    pos = torch.tensor([True, True, False, False])
    assert binary_auc(scores, pos) == pytest.approx(0.875)
    assert math.isnan(binary_auc(scores, torch.ones(4, dtype=torch.bool)))


def test_auc_binary_matches_sklearn_with_ties() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (200, 2), generator=g).float()  # many ties
    target = torch.randint(0, 2, (200,), generator=g)
    probs = torch.softmax(logits, dim=1)
    expected = roc_auc_score(target.numpy(), probs[:, 1].numpy())
    assert auc(probs, target) == pytest.approx(expected, abs=1e-12)
    assert auc(logits, target) == pytest.approx(expected, abs=1e-12)  # logits are softmaxed first
    assert auc(probs[:, 1], target) == pytest.approx(expected, abs=1e-12)  # 1-D positive-class scores


def test_auc_multiclass_matches_sklearn_ovr_macro() -> None:
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randint(0, 3, (300, 4), generator=g).float(), dim=1)
    target = torch.randint(0, 4, (300,), generator=g)
    expected = roc_auc_score(target.numpy(), probs.numpy(), multi_class="ovr", average="macro")
    per_class = np.mean([roc_auc_score(target.numpy() == c, probs[:, c].numpy()) for c in range(4)])
    assert expected == pytest.approx(per_class)
    assert auc(probs, target) == pytest.approx(expected, abs=1e-12)


def test_auc_single_class_is_nan() -> None:
    assert math.isnan(auc(torch.rand(5, 3), torch.zeros(5, dtype=torch.long)))


# --- segmentation ---------------------------------------------------------------------------------------


def test_confusion_miou_with_absent_class_and_ignore() -> None:
    # 4 classes; class 3 occurs in neither gt nor prediction. -1 pixels are ignored whatever is predicted.
    target = torch.tensor([[0, 0, 1, 1], [1, 2, 2, -1], [0, 1, 2, -1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 2, 3], [0, 1, 0, 3]])
    conf = confusion_matrix(pred, target, num_classes=4, ignore_index=-1)
    # rows gt, cols pred:  gt0 -> pred 0,1,0 ; gt1 -> 1,1,2,1 ; gt2 -> 2,2,0
    expected = torch.tensor([[2, 1, 0, 0], [0, 3, 1, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    assert torch.equal(conf, expected)
    # IoU0 = 2/(3+3-2)=1/2, IoU1 = 3/(4+4-3)=3/5, IoU2 = 2/(3+3-2)=1/2, class 3 excluded
    iou = iou_per_class(conf)
    assert iou[:3].tolist() == pytest.approx([0.5, 0.6, 0.5])
    assert math.isnan(iou[3].item())
    assert miou(conf) == pytest.approx((0.5 + 0.6 + 0.5) / 3)
    assert pixel_accuracy(conf) == pytest.approx(7 / 10)


def test_miou_class_predicted_but_absent_from_gt_counts_as_zero() -> None:
    conf = confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 0]), num_classes=3)
    # IoU0 = 1/3, IoU1 = 0 (only false positives), class 2 absent from both -> excluded
    assert miou(conf) == pytest.approx((1 / 3 + 0.0) / 2)


def test_confusion_from_logits_and_bad_target() -> None:
    logits = torch.zeros(1, 3, 1, 2)
    logits[0, 2, 0, 0] = 1.0
    logits[0, 1, 0, 1] = 1.0
    conf = confusion_matrix(logits, torch.tensor([[[2, 255]]]), num_classes=3, ignore_index=255)
    assert conf.sum() == 1 and conf[2, 2] == 1
    with pytest.raises(ValueError):
        confusion_matrix(logits, torch.tensor([[[2, 7]]]), num_classes=3, ignore_index=255)


# --- depth and normals ----------------------------------------------------------------------------------


def test_depth_errors_skip_invalid_pixels() -> None:
    target = torch.tensor([[[[2.0, 4.0], [0.0, 1.0]]]])  # (1, 1, 2, 2); the 0 pixel is invalid
    pred = torch.tensor([[[[3.0, 3.0], [9.0, 1.5]]]])
    # |d| = 1, 1, 0.5 -> abs 2.5/3 ; rel = 1/2 + 1/4 + 0.5/1 = 1.25 -> 1.25/3
    assert abs_err(pred, target) == pytest.approx(2.5 / 3)
    assert rel_err(pred, target) == pytest.approx(1.25 / 3)
    assert abs_err(pred, target[:, 0]) == pytest.approx(2.5 / 3)  # (N, H, W) target accepted


def _normals(vectors: list[list[float]]) -> torch.Tensor:
    """(1, 3, 1, K) normal map from K 3-vectors."""
    return torch.tensor(vectors, dtype=torch.float32).T.reshape(1, 3, 1, -1)


def test_normal_angles_at_known_angles() -> None:
    target = _normals([[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 0]])
    pred = _normals([[0, 0, 5], [1, 0, 0], [0, 0, -2], [0, 1, 1], [1, 0, 0]])  # last pixel invalid
    angles = normal_angle_errors(pred, target)
    assert angles.tolist() == pytest.approx([0.0, 90.0, 180.0, 45.0], abs=1e-9)
    m = normal_metrics(pred, target)
    assert m["mean"] == pytest.approx(315 / 4)
    assert m["median"] == pytest.approx((45 + 90) / 2)
    assert m["within_11.25"] == pytest.approx(0.25)
    assert m["within_22.5"] == pytest.approx(0.25)
    assert m["within_30"] == pytest.approx(0.25)


# --- meters ---------------------------------------------------------------------------------------------


Batch = tuple[torch.Tensor, torch.Tensor]


def _batches(make: Callable[[torch.Generator, int], Batch]) -> list[Batch]:
    """Three batches of unequal sizes (3, 5, 2) from ``make(generator, batch_size)``."""
    g = torch.Generator().manual_seed(42)
    return [make(g, size) for size in (3, 5, 2)]


def test_classification_meter_streams_exactly() -> None:
    task = TaskInfo("t", "classification", num_classes=3)
    batches = _batches(lambda g, b: (torch.randn(b, 3, generator=g), torch.randint(0, 3, (b,), generator=g)))
    meter = make_meter(task)
    for p, t in batches:
        meter.update(p, t)
    logits = torch.cat([p for p, _ in batches])
    target = torch.cat([t for _, t in batches])
    out = meter.compute()
    assert set(out) == {"acc", "auc"}
    assert out["acc"] == pytest.approx(accuracy(logits, target))
    assert out["auc"] == pytest.approx(auc(logits, target, from_logits=True), abs=1e-6)
    meter.reset()
    meter.update(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    assert math.isnan(meter.compute()["auc"])


def test_segmentation_meter_streams_exactly() -> None:
    task = TaskInfo("seg", "segmentation", num_classes=4, ignore_index=-1)

    def make(g: torch.Generator, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(b, 4, 3, 5, generator=g), torch.randint(-1, 4, (b, 3, 5), generator=g)

    batches = _batches(make)
    meter = make_meter(task)
    for p, t in batches:
        meter.update(p, t)
    conf = confusion_matrix(torch.cat([p for p, _ in batches]), torch.cat([t for _, t in batches]), 4, -1)
    assert meter.compute() == pytest.approx({"miou": miou(conf), "pix_acc": pixel_accuracy(conf)})


def test_depth_meter_is_pixel_weighted_not_batch_mean() -> None:
    task = TaskInfo("depth", "depth")

    def make(g: torch.Generator, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.rand(b, 1, 4, 4, generator=g) + 0.5
        t[t < 0.8] = 0.0  # invalid pixels, a different number per batch
        return torch.rand(b, 1, 4, 4, generator=g), t

    batches = _batches(make)
    meter = make_meter(task)
    for p, t in batches:
        meter.update(p, t)
    pred, target = torch.cat([p for p, _ in batches]), torch.cat([t for _, t in batches])
    out = meter.compute()
    assert out["abs_err"] == pytest.approx(abs_err(pred, target), rel=1e-12)
    assert out["rel_err"] == pytest.approx(rel_err(pred, target), rel=1e-12)


def test_normal_meter_streams_exactly() -> None:
    task = TaskInfo("normal", "normal")

    def make(g: torch.Generator, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randn(b, 3, 4, 4, generator=g)
        t[:, :, 0, 0] = 0.0  # invalid pixel
        return torch.randn(b, 3, 4, 4, generator=g), t

    batches = _batches(make)
    meter = make_meter(task)
    for p, t in batches:
        meter.update(p, t)
    expected = normal_metrics(torch.cat([p for p, _ in batches]), torch.cat([t for _, t in batches]))
    out = meter.compute()
    assert set(out) == {"mean", "median", "within_11.25", "within_22.5", "within_30"}
    assert out == pytest.approx(expected, abs=1e-4)
    all_angles = normal_angle_errors(torch.cat([p for p, _ in batches]), torch.cat([t for _, t in batches]))
    assert out["median"] == pytest.approx(float(np.median(all_angles.numpy())), abs=1e-4)


def test_metric_names_and_primary() -> None:
    names = {"acc", "auc", "miou", "pix_acc", "abs_err", "rel_err", "mean", "median"}
    names |= {"within_11.25", "within_22.5", "within_30"}
    assert set(HIGHER_IS_BETTER) == names
    kinds = {"classification": "acc", "segmentation": "miou", "depth": "abs_err", "normal": "mean"}
    for kind, name in kinds.items():
        assert primary_metric(TaskInfo("x", kind, num_classes=2)) == name


# --- Delta_m --------------------------------------------------------------------------------------------


def test_delta_m_sign_convention() -> None:
    single = {"a": {"acc": 0.80}}
    better = {"a": {"acc": 0.88}}
    dm = delta_m(better, single)
    assert dm == pytest.approx(-10.0)
    assert delta_p(better, single) == pytest.approx(10.0)


def test_delta_m_two_task_hand_example() -> None:
    single = {"seg": {"miou": 0.40, "pix_acc": 0.50}, "depth": {"abs_err": 0.60}}
    model = {"seg": {"miou": 0.44, "pix_acc": 0.45}, "depth": {"abs_err": 0.45}}
    # seg: miou +10% (higher better) -> -0.10 ; pix_acc -10% -> +0.10 ; task mean 0
    # depth: abs_err -25% (lower better) -> -0.25 ; Delta_m = 100/2 * (0 - 0.25) = -12.5
    assert delta_m(model, single) == pytest.approx(-12.5)
    assert delta_p(model, single) == pytest.approx(12.5)
    # a custom direction overrides the default table
    assert delta_m({"t": {"loss": 2.0}}, {"t": {"loss": 1.0}}, {"loss": False}) == pytest.approx(100.0)


def test_delta_m_errors() -> None:
    with pytest.raises(ValueError, match="depth"):
        delta_m({"depth": {"abs_err": 1.0}}, {"seg": {"miou": 1.0}})
    with pytest.raises(ValueError, match="rel_err"):
        delta_m({"depth": {"rel_err": 1.0}}, {"depth": {"abs_err": 1.0}})
    with pytest.raises(ValueError, match="zero"):
        delta_m({"depth": {"abs_err": 1.0}}, {"depth": {"abs_err": 0.0}})


def test_mean_over_tasks() -> None:
    results = {"a": {"acc": 0.5, "auc": 0.9}, "b": {"acc": 0.7}, "c": {"acc": 0.9, "auc": 0.7}}
    assert mean_over_tasks(results) == pytest.approx({"acc": 0.7, "auc": 0.8})


@pytest.mark.parametrize("kind", ["classification", "segmentation", "depth", "normal"])
def test_meters_merged_by_declared_state_equal_one_meter(kind: str) -> None:
    """Two meters fed the two halves of the batches (two DDP ranks), merged by their declared states, compute
    what one meter fed every batch computes; every accumulated attribute is a declared state."""
    from mola.metrics import make_meter

    g = torch.Generator().manual_seed(0)
    task = TaskInfo("t", kind, num_classes=4 if kind in ("classification", "segmentation") else None)
    batches = []
    for _ in range(4):
        if kind == "classification":
            batches.append((torch.randn(6, 4, generator=g), torch.randint(0, 4, (6,), generator=g)))
        elif kind == "segmentation":
            batches.append((torch.randn(2, 4, 5, 5, generator=g), torch.randint(0, 4, (2, 5, 5), generator=g)))
        elif kind == "depth":
            batches.append((torch.rand(2, 1, 5, 5, generator=g) + 0.1, torch.rand(2, 1, 5, 5, generator=g)))
        else:
            batches.append((torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)))
    one, ranks = make_meter(task), [make_meter(task), make_meter(task)]
    for i, (p, t) in enumerate(batches):
        one.update(p, t)
        ranks[i % 2].update(p, t)
    declared = set(one.reductions())
    assert {k for k in vars(one) if k not in ("task", "_defaults")} == declared
    ranks[0].merge(ranks[1])
    want, got = one.compute(), ranks[0].compute()
    assert set(want) == set(got)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9, nan_ok=True), k
    ranks[0].reset()
    assert all(not getattr(ranks[0], k) if isinstance(getattr(ranks[0], k), list) else
               float(torch.as_tensor(getattr(ranks[0], k)).abs().sum()) == 0 for k in declared)


def test_task_kinds_live_in_one_registry() -> None:
    """Every task kind has a spec, a loss and a meter; an unknown kind is one clear error wherever it is used."""
    from mola.engine.losses import LOSSES
    from mola.metrics import make_meter
    from mola.tasks import TASK_KINDS

    assert set(TASK_KINDS) == set(LOSSES) == {"classification", "segmentation", "depth", "normal"}
    assert [TaskInfo("t", k, num_classes=5).out_channels for k in TASK_KINDS] == [5, 5, 1, 3]
    bad = TaskInfo("t", "bogus")  # type: ignore[arg-type]
    for use in (lambda: bad.out_channels, lambda: make_meter(bad)):
        with pytest.raises(ValueError, match=r"task 't' has unknown kind 'bogus'; known: classification"):
            use()
