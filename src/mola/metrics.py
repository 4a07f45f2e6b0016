"""Evaluation metrics (docs/results.md): functional metrics, streaming per-task meters, Delta_m / Delta_p.

Conventions: accuracies, IoUs, AUCs and "within t degrees" shares are fractions in [0, 1]; depth errors are in
the target's units; normal angle errors are in degrees. Every meter aggregates exactly over all samples or
pixels it has seen (never a mean of batch means).
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mola.tasks import TaskInfo

NORMAL_THRESHOLDS: tuple[float, ...] = (11.25, 22.5, 30.0)
"""Angle thresholds (degrees) of the normal "within" metrics; a pixel counts when its error is below."""

HIGHER_IS_BETTER: dict[str, bool] = {
    "acc": True,
    "auc": True,
    "miou": True,
    "pix_acc": True,
    "abs_err": False,
    "rel_err": False,
    "mean": False,
    "median": False,
    "within_11.25": True,
    "within_22.5": True,
    "within_30": True,
}
"""Whether a larger value is better, for every metric name the meters produce."""

_PRIMARY = {"classification": "acc", "segmentation": "miou", "depth": "abs_err", "normal": "mean"}


def primary_metric(task: TaskInfo) -> str:
    """The metric used to rank models on ``task``: acc, miou, abs_err or mean (angle error) by task kind."""
    try:
        return _PRIMARY[task.kind]
    except KeyError:
        raise ValueError(f"task {task.name!r} has unknown kind {task.kind!r}") from None


# ----------------------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------------------


def _to_labels(pred: Tensor, target: Tensor) -> Tensor:
    """Class labels from ``pred``: argmax over dim 1 when it carries one more (class) dim than ``target``."""
    if pred.dim() == target.dim() + 1:
        return pred.argmax(dim=1)
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
    if pred.is_floating_point():
        raise ValueError(
            "pred has the target's shape but is floating point; pass labels or (N, C, ...) scores"
        )
    return pred


def accuracy(logits_or_pred: Tensor, target: Tensor) -> float:
    """Fraction of correct predictions; ``logits_or_pred`` is (N, C) scores (argmax taken) or (N,) labels."""
    labels = _to_labels(logits_or_pred, target)
    if target.numel() == 0:
        return float("nan")
    return (labels == target).double().mean().item()


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of a 1-D tensor, ties sharing the average of the ranks they span."""
    order = torch.argsort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()  # rank of the last element of each tie group
    group_rank = ends - (counts.double() - 1.0) / 2.0
    ranks = torch.empty(x.numel(), dtype=torch.float64, device=x.device)
    ranks[order] = group_rank[inverse]
    return ranks


def binary_auc(scores: Tensor, positive: Tensor) -> float:
    """ROC AUC of 1-D ``scores`` for boolean ``positive`` (Mann-Whitney, ties count 1/2); nan if one class."""
    scores = scores.reshape(-1).double()
    positive = positive.reshape(-1).bool()
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = _average_ranks(scores)[positive].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _looks_like_probabilities(scores: Tensor) -> bool:
    """True when every row of (N, C) ``scores`` lies in [0, 1] and sums to 1."""
    if scores.numel() == 0:
        return True
    s = scores.double()
    in_range = bool(((s >= 0) & (s <= 1)).all())
    return in_range and bool(torch.allclose(s.sum(dim=1), torch.ones_like(s[:, 0]), atol=1e-4))


def auc(scores: Tensor, target: Tensor, from_logits: bool | None = None) -> float:
    """MedMNIST-style AUC of (N, C) class scores: C == 2 -> ROC AUC of class 1; C > 2 -> mean one-vs-rest AUC.

    Scores are softmaxed when ``from_logits`` (None: when rows are not already probability vectors). Also
    accepts (N,) scores of the positive class (binary). In the multi-class case classes absent from ``target``
    (one-vs-rest AUC undefined) are left out of the mean; nan if fewer than two classes occur in ``target``.
    """
    target = target.reshape(-1).long()
    if scores.dim() == 1:
        return binary_auc(scores, target == 1)
    if scores.dim() != 2 or scores.shape[0] != target.numel():
        raise ValueError(f"scores must be (N, C) with N = {target.numel()}, got {tuple(scores.shape)}")
    if from_logits is None:
        from_logits = not _looks_like_probabilities(scores)
    probs = torch.softmax(scores.double(), dim=1) if from_logits else scores.double()
    if torch.unique(target).numel() < 2:
        return float("nan")
    num_classes = probs.shape[1]
    if num_classes == 2:
        return binary_auc(probs[:, 1], target == 1)
    per_class = [binary_auc(probs[:, c], target == c) for c in range(num_classes)]
    defined = [a for a in per_class if not math.isnan(a)]
    return sum(defined) / len(defined) if defined else float("nan")


# ----------------------------------------------------------------------------------------------------------
# Segmentation
# ----------------------------------------------------------------------------------------------------------


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = -1) -> Tensor:
    """(C, C) int64 counts, rows = ground truth, columns = prediction; ignore_index target pixels dropped.

    ``pred`` is (N, C, ...) scores (argmax over dim 1) or labels shaped like ``target``. Targets outside
    [0, C) other than ``ignore_index`` raise ValueError.
    """
    if target.dim() == pred.dim() and target.dim() >= 2 and target.shape[1] == 1 and pred.shape[1] != 1:
        target = target.squeeze(1)  # (N, 1, H, W) target beside (N, C, H, W) logits
    labels = _to_labels(pred, target).reshape(-1).long()
    target = target.reshape(-1).long()
    valid = target != ignore_index
    labels, target = labels[valid], target[valid]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"segmentation targets must lie in [0, {num_classes}) or equal {ignore_index}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"predicted labels must lie in [0, {num_classes})")
    idx = target * num_classes + labels
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def iou_per_class(conf: Tensor) -> Tensor:
    """Per-class IoU TP / (TP + FP + FN) from a confusion matrix; nan for classes absent from gt and pred."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(dim=0) + conf.sum(dim=1) - tp
    iou = torch.full_like(tp, float("nan"))
    present = union > 0
    iou[present] = tp[present] / union[present]
    return iou


def miou(conf: Tensor) -> float:
    """Mean IoU over classes present in the ground truth or the prediction (absent classes are excluded)."""
    iou = iou_per_class(conf)
    present = ~torch.isnan(iou)
    return iou[present].mean().item() if bool(present.any()) else float("nan")


def pixel_accuracy(conf: Tensor) -> float:
    """Fraction of counted (non-ignored) pixels labelled correctly, from a confusion matrix."""
    total = conf.sum().item()
    return conf.diag().sum().item() / total if total else float("nan")


# ----------------------------------------------------------------------------------------------------------
# Depth and surface normals
# ----------------------------------------------------------------------------------------------------------


def _match_dense(pred: Tensor, target: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """Bring dense pred/target to one (N, channels, ...) shape, adding a channel dim to depth targets."""
    if channels == 1:
        if pred.dim() == target.dim() + 1 and pred.shape[1] == 1:
            target = target.unsqueeze(1)
        elif target.dim() == pred.dim() + 1 and target.shape[1] == 1:
            pred = pred.unsqueeze(1)
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
    if pred.dim() < 2 or pred.shape[1] != channels:
        raise ValueError(f"expected (N, {channels}, ...) tensors, got {tuple(pred.shape)}")
    return pred, target


def _depth_sums(pred: Tensor, target: Tensor) -> tuple[float, float, int]:
    """Sum of |pred - target|, sum of |pred - target| / target, and count, over valid pixels (target > 0)."""
    pred, target = _match_dense(pred, target, 1)
    valid = target > 0
    p, t = pred[valid].double(), target[valid].double()
    diff = (p - t).abs()
    return diff.sum().item(), (diff / t).sum().item(), int(valid.sum())


def abs_err(pred: Tensor, target: Tensor) -> float:
    """Mean absolute depth error over valid pixels (target > 0); nan if none are valid."""
    s_abs, _, n = _depth_sums(pred, target)
    return s_abs / n if n else float("nan")


def rel_err(pred: Tensor, target: Tensor) -> float:
    """Mean relative depth error |pred - target| / target over valid pixels (target > 0); nan if none."""
    _, s_rel, n = _depth_sums(pred, target)
    return s_rel / n if n else float("nan")


def normal_angle_errors(pred: Tensor, target: Tensor) -> Tensor:
    """1-D float64 angles (degrees) between normalised pred and target normals at valid pixels (|target| > 0).

    Tensors are (N, 3, ...). A zero predicted vector is 90 degrees from any target.
    """
    pred, target = _match_dense(pred, target, 3)
    p = pred.double().movedim(1, -1).reshape(-1, 3)
    t = target.double().movedim(1, -1).reshape(-1, 3)
    valid = t.norm(dim=1) > 0
    p, t = F.normalize(p[valid], dim=1), F.normalize(t[valid], dim=1)
    cos = (p * t).sum(dim=1).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(cos))


def _median(x: Tensor) -> float:
    """Median of a 1-D tensor, averaging the two middle values for an even length (numpy's convention)."""
    n = x.numel()
    if n == 0:
        return float("nan")
    lo = torch.kthvalue(x, (n + 1) // 2).values.item()
    if n % 2:
        return lo
    return (lo + torch.kthvalue(x, n // 2 + 1).values.item()) / 2.0


def _threshold_name(t: float) -> str:
    """Metric name for an angle threshold: within_11.25, within_22.5, within_30."""
    return f"within_{t:g}"


def normal_metrics_from_angles(angles: Tensor) -> dict[str, float]:
    """mean, median and within_{11.25, 22.5, 30} (fraction strictly below) of angle errors in degrees."""
    n = angles.numel()
    out = {"mean": angles.double().mean().item() if n else float("nan"), "median": _median(angles)}
    for t in NORMAL_THRESHOLDS:
        out[_threshold_name(t)] = (angles < t).sum().item() / n if n else float("nan")
    return out


def normal_metrics(pred: Tensor, target: Tensor) -> dict[str, float]:
    """Surface-normal angle metrics of (N, 3, ...) predictions over valid pixels (target norm > 0)."""
    return normal_metrics_from_angles(normal_angle_errors(pred, target))


# ----------------------------------------------------------------------------------------------------------
# Streaming meters
# ----------------------------------------------------------------------------------------------------------


Reduction = Literal["sum", "cat"]


class Meter(ABC):
    """Accumulates one task's predictions over batches; ``compute`` gives exact dataset-level metrics.

    Every accumulated value is a declared state (``add_state(name, default, reduction)``), as in torchmetrics:
    "sum" states (numbers or tensors) add up across batches and processes, "cat" states (lists of tensors) are
    concatenated. State stays where the predictions live (no per-batch host sync); ``merge`` and the DDP merge
    (``DistContext.merge_meters``: one all-reduce of every sum state) use only these declarations."""

    def __init__(self, task: TaskInfo) -> None:
        self.task = task
        self._defaults: dict[str, tuple[Any, Reduction]] = {}
        self.declare()
        self.reset()

    @abstractmethod
    def declare(self) -> None:
        """Declare the meter's states with ``add_state``."""

    def add_state(self, name: str, default: Any, reduction: Reduction) -> None:
        """Declare state ``name``: its value after ``reset`` (a number, a tensor, or [] for "cat") and how two
        partial states combine."""
        if reduction not in ("sum", "cat"):
            raise ValueError(f"state {name!r}: reduction must be 'sum' or 'cat', got {reduction!r}")
        self._defaults[name] = (default, reduction)

    def reductions(self) -> dict[str, Reduction]:
        """State name -> reduction, in declaration order."""
        return {k: r for k, (_, r) in self._defaults.items()}

    def reset(self) -> None:
        """Forget everything seen so far: every state back to its default."""
        for name, (default, _) in self._defaults.items():
            setattr(self, name, default.clone() if isinstance(default, Tensor) else copy.copy(default))

    def merge(self, other: Meter) -> None:
        """Add ``other``'s states (same kind of meter, e.g. another process's) into this one."""
        for name, reduction in self.reductions().items():
            mine, theirs = getattr(self, name), getattr(other, name)
            if reduction == "cat":
                setattr(self, name, [*mine, *theirs])
            else:
                if isinstance(mine, Tensor) and isinstance(theirs, Tensor):
                    theirs = theirs.to(mine.device)
                setattr(self, name, mine + theirs)

    @abstractmethod
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch: ``pred`` is the raw head output, ``target`` the matching ground truth."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """Metrics over every batch seen since the last reset."""


class ClassificationMeter(Meter):
    """Accuracy and AUC from (N, C) logits; softmax scores are kept for the dataset-level AUC."""

    def declare(self) -> None:
        self.add_state("correct", 0, "sum")
        self.add_state("total", 0, "sum")
        self.add_state("scores", [], "cat")
        self.add_state("targets", [], "cat")

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.dim() != 2:
            raise ValueError(f"classification pred must be (N, C) logits, got {tuple(pred.shape)}")
        target = target.reshape(-1).long()
        self.correct = self.correct + (pred.argmax(dim=1) == target).sum()
        self.total += target.numel()
        self.scores.append(torch.softmax(pred.detach().float(), dim=1))
        self.targets.append(target.detach())

    def compute(self) -> dict[str, float]:
        if not self.total:
            return {"acc": float("nan"), "auc": float("nan")}
        scores, targets = torch.cat(self.scores).cpu(), torch.cat(self.targets).cpu()
        return {"acc": float(self.correct) / self.total, "auc": auc(scores, targets, from_logits=False)}


class SegmentationMeter(Meter):
    """mIoU and pixel accuracy from a confusion matrix accumulated over all non-ignored pixels."""

    def declare(self) -> None:
        c = self.task.out_channels
        self.add_state("conf", torch.zeros(c, c, dtype=torch.int64), "sum")

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        self.conf = self.conf.to(pred.device) + confusion_matrix(pred.detach(), target, self.conf.shape[0],
                                                                 self.task.ignore_index)

    def compute(self) -> dict[str, float]:
        return {"miou": miou(self.conf.cpu()), "pix_acc": pixel_accuracy(self.conf.cpu())}


class DepthMeter(Meter):
    """Absolute and relative depth error summed over every valid pixel (target > 0) of every batch."""

    def declare(self) -> None:
        self.add_state("sum_abs", 0.0, "sum")
        self.add_state("sum_rel", 0.0, "sum")
        self.add_state("count", 0, "sum")

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        s_abs, s_rel, n = _depth_sums(pred.detach(), target)
        self.sum_abs += s_abs
        self.sum_rel += s_rel
        self.count += n

    def compute(self) -> dict[str, float]:
        if not self.count:
            return {"abs_err": float("nan"), "rel_err": float("nan")}
        return {"abs_err": self.sum_abs / self.count, "rel_err": self.sum_rel / self.count}


class NormalMeter(Meter):
    """Normal angle metrics over every valid pixel; keeps all angles (float32) for the exact median."""

    def declare(self) -> None:
        self.add_state("angles", [], "cat")

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        self.angles.append(normal_angle_errors(pred.detach(), target).float())

    def compute(self) -> dict[str, float]:
        angles = torch.cat(self.angles).cpu() if self.angles else torch.zeros(0)
        return normal_metrics_from_angles(angles)


_METERS: dict[str, type[Meter]] = {
    "classification": ClassificationMeter,
    "segmentation": SegmentationMeter,
    "depth": DepthMeter,
    "normal": NormalMeter,
}


def make_meter(task: TaskInfo) -> Meter:
    """A fresh streaming meter for ``task``'s kind (classification, segmentation, depth or normal)."""
    return _METERS[task.spec.name](task)


# ----------------------------------------------------------------------------------------------------------
# Multi-task summaries
# ----------------------------------------------------------------------------------------------------------


def delta_m(
    scores: Mapping[str, Mapping[str, float]],
    single_task_scores: Mapping[str, Mapping[str, float]],
    higher_is_better: Mapping[str, bool] | None = None,
) -> float:
    """Delta_m% vs single-task baselines (docs/results.md), lower is better; mean over the tasks of ``scores``.

    Delta_m = (100/T) sum_t (1/|M_t|) sum_m (-1)^{h_m} (M_m - M_single) / M_single; ``higher_is_better``
    entries override ``HIGHER_IS_BETTER``. Raises ValueError on missing baselines or a zero baseline.
    """
    hib = {**HIGHER_IS_BETTER, **(higher_is_better or {})}
    if not scores:
        raise ValueError("delta_m needs at least one task")
    total = 0.0
    for task, metrics in scores.items():
        if not metrics:
            raise ValueError(f"task {task!r} has no metrics")
        if task not in single_task_scores:
            raise ValueError(f"no single-task scores for task {task!r}")
        task_sum = 0.0
        for name, value in metrics.items():
            if name not in single_task_scores[task]:
                raise ValueError(f"no single-task score for metric {name!r} of task {task!r}")
            if name not in hib:
                raise ValueError(f"unknown direction for metric {name!r}; pass it in higher_is_better")
            base = float(single_task_scores[task][name])
            if base == 0.0:
                raise ValueError(f"single-task score for metric {name!r} of task {task!r} is zero")
            sign = -1.0 if hib[name] else 1.0
            task_sum += sign * (float(value) - base) / base
        total += task_sum / len(metrics)
    return 100.0 * total / len(scores)


def delta_p(
    scores: Mapping[str, Mapping[str, float]],
    single_task_scores: Mapping[str, Mapping[str, float]],
    higher_is_better: Mapping[str, bool] | None = None,
) -> float:
    """Delta_p% = -Delta_m% (LibMTL's sign convention: higher is better)."""
    return -delta_m(scores, single_task_scores, higher_is_better)


def mean_over_tasks(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric over the tasks that report it (the paper's "Avg"); nan values propagate."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for metrics in results.values():
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + float(value)
            counts[name] = counts.get(name, 0) + 1
    return {name: sums[name] / counts[name] for name in sums}
