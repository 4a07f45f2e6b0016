"""Model selection: how the best checkpoint is chosen (``train.select_on``/``select_metric``), its up-front checks,
non-finite validation metrics, and the delta against single-task results written into final.json."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from mola.engine.config import RunConfig, TrainConfig
from mola.metrics import HIGHER_IS_BETTER, delta_m, delta_p, make_meter, primary_metric
from mola.tasks import TaskInfo

INVALID_SELECTION = ("test_loss: NOT a valid protocol - the checkpoint was selected on the test split's loss "
                     "(as the paper's released code did), so its test scores are optimistic")
"""What every output of a ``train.select_on: test_loss`` run says about its model selection."""


def selection_label(cfg: RunConfig) -> str:
    """How the best checkpoint was chosen, for metrics.csv, final.json and the CLI line."""
    return INVALID_SELECTION if cfg.train.select_on == "test_loss" else f"val ({cfg.train.select_metric})"


class NonFiniteError(RuntimeError):
    """A run produced NaN/inf (a loss, the weights or a validation metric); ``mola`` exits with status 3."""


class NonFiniteLossError(NonFiniteError):
    """A task loss (or the weights) became NaN/inf; the message names the step, the task and the last good
    checkpoint."""


class NonFiniteMetricError(NonFiniteError):
    """A validation loss or selection metric is NaN/inf; the message names the task, epoch, split and metric."""


def check_select_metric(key: str, tasks: list[TaskInfo]) -> None:
    """``train.select_metric`` must be reported by some task: checked when the run is built, not after an epoch."""
    if key == "auto":
        return
    reported = {"loss"}
    for task in tasks:
        try:
            reported |= set(make_meter(task).compute())
        except Exception:  # noqa: BLE001 - a meter that cannot compute empty: its names are unknown here
            return
    if key not in reported:
        raise ValueError(f"train.select_metric {key!r} is not reported by any task of this scenario; "
                         f"valid: {', '.join(sorted(reported))}")


def check_single_task_results(ref: str | None, tasks: list[TaskInfo]) -> None:
    """``train.single_task_results`` must be a readable final.json with test metrics for every task: checked
    when the run is built, not after all the training."""
    if not ref:
        return
    p = Path(ref)
    if not p.is_file():
        raise FileNotFoundError(f"train.single_task_results: file not found: {p} (the final.json of a "
                                "single-task run)")
    try:
        single = json.loads(p.read_text())["test"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"train.single_task_results {p} is not a final.json with test metrics ({err!r})") from err
    missing = [t.name for t in tasks if not isinstance(single, dict) or not isinstance(
        single.get(t.name), dict) or primary_metric(t) not in single[t.name]]
    if missing:
        metrics = "/".join(sorted({primary_metric(t) for t in tasks}))
        raise ValueError(f"train.single_task_results {p} has no test {metrics} for task(s) {', '.join(missing)}")


def select_score(val: dict[str, dict[str, float]], tasks: list[TaskInfo], train: TrainConfig, epoch: int,
                 last_good: str) -> float:
    """Higher is better. Default: mean accuracy if every task classifies, else minus the mean val loss.

    A task whose val loss or selection metric is NaN/inf raises NonFiniteMetricError naming the task, epoch
    and split; with ``train.on_nonfinite_metric: drop`` it is left out of the score with a warning."""
    key = train.select_metric
    if key == "auto":
        key = "acc" if all(t.kind == "classification" for t in tasks) else "loss"
    if not any(key in r for r in val.values()):
        raise ValueError(f"train.select_metric {key!r} is not reported by any task")
    bad = {name: (m, r[m]) for name, r in val.items() for m in dict.fromkeys(("loss", key))
           if m in r and not math.isfinite(r[m])}
    if bad:
        what = "; ".join(f"task {n!r}: val {m} = {v}" for n, (m, v) in bad.items())
        if train.on_nonfinite_metric != "drop" or len(bad) == len(val):
            raise NonFiniteMetricError(
                f"non-finite validation metric at epoch {epoch} (split val): {what}; the best-on-val "
                f"checkpoint cannot be chosen. Last good checkpoint: {last_good}"
                + ("" if len(bad) == len(val) else
                   " (set train.on_nonfinite_metric=drop to leave such tasks out of the selection score)"))
        warnings.warn(f"epoch {epoch}: leaving task(s) {', '.join(repr(n) for n in bad)} out of the selection "
                      f"score (non-finite: {what}; train.on_nonfinite_metric=drop)", RuntimeWarning, stacklevel=3)
    vals = [r[key] for n, r in val.items() if key in r and n not in bad]
    score = float(np.mean(vals))
    return score if HIGHER_IS_BETTER.get(key, key != "loss") else -score


def deltas_against_single_task(test: dict[str, dict[str, float]], tasks: list[TaskInfo],
                               single_task_results: str) -> dict[str, Any]:
    """``delta_m``/``delta_p`` of the test metrics against a single-task run's final.json (docs/results.md)."""
    single = json.loads(Path(single_task_results).read_text())["test"]
    primary = {t.name: primary_metric(t) for t in tasks}
    mine = {n: {primary[n]: r[primary[n]]} for n, r in test.items()}
    ref = {n: {primary[n]: single[n][primary[n]]} for n in mine}
    return {"delta_m": delta_m(mine, ref), "delta_p": delta_p(mine, ref)}


__all__ = ["INVALID_SELECTION", "NonFiniteError", "NonFiniteLossError", "NonFiniteMetricError", "check_select_metric",
           "check_single_task_results", "deltas_against_single_task", "select_score", "selection_label"]
