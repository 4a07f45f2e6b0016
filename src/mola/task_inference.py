"""Which task does an input belong to? Nearest task centroid of the router code z (MoLA-Router, docs/concepts.md).

Codes are L2-normalised first (u = z / ||z||, as the TwD loss and ``mola.analysis.routing`` see them). At the end
of training the mean normalised code of each task on the training split is stored next to the run
(``RUN_DIR/task_centroids.json``). A new input's inferred task is the nearest centroid (Euclidean), and its
confidence is that task's posterior under one isotropic Gaussian per task (shared variance, equal priors):

    p(t | u) = softmax_t( -||u - c_t||^2 / (2 sigma^2) )

sigma^2 is fitted on the validation split by maximum likelihood of the true task (temperature scaling, one
scalar), so confidences are calibrated on data the centroids were not computed from; without validation codes it
falls back to the within-task spread of the training codes, mean_i ||u_i - c_{t_i}||^2 / d (overconfident on new
data). The nearest centroid is always the most probable task, so the confidence lies in [1/T, 1].
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from mola.analysis.routing import (
    collect_codes,
    mean_weights_per_task,
    normalize_codes,
    predict_task,
    sample_loader,
    task_centroids,
)
from mola.engine.run import load_run, run_dir_of
from mola.files import write_text
from mola.inject import find_mola_model

if TYPE_CHECKING:
    from mola.engine import Trainer

CENTROIDS_FILE = "task_centroids.json"
FORMAT = "mola-task-centroids"
MAX_SAMPLES = 50_000


@dataclass
class TaskCentroids:
    """Mean normalised router code per task (T, d), the shared variance sigma^2 and the training counts."""

    tasks: list[str]
    centroids: np.ndarray
    sigma2: float
    counts: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def mean_weights(self) -> np.ndarray | None:
        """(T, E) mean router mixing weight per task over the training codes (None if not stored)."""
        mw = self.meta.get("mean_weights")
        return None if mw is None else np.array([[math.nan if v is None else v for v in r] for r in mw], float)

    def sq_distances(self, z: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, T) squared Euclidean distances of the normalised codes to each centroid (inf for empty tasks)."""
        u = normalize_codes(z.detach().cpu().numpy() if isinstance(z, torch.Tensor) else z)
        if u.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"codes have size {u.shape[1]}, the centroids {self.centroids.shape[1]}")
        d = ((u[:, None, :] - self.centroids[None, :, :]) ** 2).sum(axis=2)
        return np.where(np.isnan(d), np.inf, d)

    def posterior(self, z: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, T) p(t | u) = softmax(-||u - c_t||^2 / (2 sigma^2))."""
        logits = -self.sq_distances(z) / (2.0 * self.sigma2)
        logits = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def infer(self, z: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(inferred task index (N,), confidence (N,)): nearest centroid and its posterior probability."""
        p = self.posterior(z)
        idx = predict_task(normalize_codes(z.detach().cpu().numpy() if isinstance(z, torch.Tensor) else z),
                           self.centroids)
        return idx, p[np.arange(len(idx)), idx]

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": 1, "tasks": list(self.tasks),
                "centroids": [[None if math.isnan(v) else float(v) for v in row] for row in self.centroids],
                "sigma2": float(self.sigma2), "counts": [int(c) for c in self.counts],
                "codes": "z / ||z||", "confidence": "softmax_t(-||u - c_t||^2 / (2 sigma2))", **self.meta}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "centroids") -> TaskCentroids:
        if data.get("format") != FORMAT:
            raise ValueError(f"{where} is not a mola task-centroids file (format {data.get('format')!r})")
        try:
            cents = np.array([[math.nan if v is None else v for v in row] for row in data["centroids"]], float)
            meta = {k: v for k, v in data.items()
                    if k not in ("format", "version", "tasks", "centroids", "sigma2", "counts", "codes", "confidence")}
            out = cls(list(data["tasks"]), cents, float(data["sigma2"]), list(data["counts"]), meta)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where} is malformed: {err}") from err
        if cents.ndim != 2 or cents.shape[0] != len(out.tasks) or not out.sigma2 > 0:
            raise ValueError(f"{where} is malformed: {cents.shape} centroids for {len(out.tasks)} tasks, "
                             f"sigma2={out.sigma2}")
        if not math.isfinite(out.sigma2):
            raise ValueError(f"{where} is malformed: sigma2={out.sigma2} is not finite")
        bad = [t for t, row, n in zip(out.tasks, cents, out.counts, strict=False) if n and not np.isfinite(row).all()]
        if bad:  # a task without codes may have an empty (NaN) centroid; one with codes may not
            raise ValueError(f"{where} is corrupt: the centroid of task(s) {', '.join(map(repr, bad))} holds NaN or "
                             "inf values (every image would go to one task); recompute it with "
                             "`mola predict --compute-centroids`")
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the JSON file atomically (temp file + rename)."""
        return write_text(json.dumps(self.to_dict(), indent=2), path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TaskCentroids:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"task centroids file {path} is not valid JSON: {err}") from err
        return cls.from_dict(data, str(path))


def posterior_nll(sigma2: float, sq_dist: np.ndarray, task_ids: np.ndarray) -> float:
    """Mean negative log p(true task | u) for squared distances (N, T) under variance ``sigma2``."""
    logits = -sq_dist / (2.0 * sigma2)
    logits = logits - logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(task_ids)), task_ids].mean())


def fit_sigma2(sq_dist: np.ndarray, task_ids: np.ndarray) -> float:
    """The sigma^2 in [1e-8, 10] that minimises ``posterior_nll`` (bounded 1-D search on log sigma^2)."""
    from scipy.optimize import minimize_scalar

    task_ids = np.asarray(task_ids)
    sq_dist = np.where(np.isinf(sq_dist), 1e6, sq_dist)
    res = minimize_scalar(lambda ls: posterior_nll(math.exp(ls), sq_dist, task_ids),
                          bounds=(math.log(1e-8), math.log(10.0)), method="bounded")
    return float(math.exp(res.x))


def fit_centroids(codes: np.ndarray, task_ids: np.ndarray, tasks: list[str], meta: dict[str, Any] | None = None,
                  val_codes: np.ndarray | None = None, val_task_ids: np.ndarray | None = None) -> TaskCentroids:
    """Centroids from training codes z (N, d) and task ids (N,); sigma^2 fitted on validation codes if given."""
    task_ids = np.asarray(task_ids)
    if len(task_ids) == 0 or (task_ids < 0).all():
        raise ValueError("task centroids need training codes with task ids (none given, or a single-input scenario)")
    u = normalize_codes(codes)
    cents = task_centroids(u, task_ids, len(tasks))
    counts = np.bincount(task_ids, minlength=len(tasks)).tolist()
    out = TaskCentroids(list(tasks), cents, 1.0, counts, dict(meta or {}))
    vt = np.asarray(val_task_ids) if val_task_ids is not None else np.zeros(0, dtype=np.int64)
    if val_codes is not None and len(vt) and (vt >= 0).all():
        out.sigma2 = fit_sigma2(out.sq_distances(val_codes), vt)
        out.meta.update(sigma2_fit="val", num_val_samples=int(len(vt)))
    else:
        resid = ((u - cents[task_ids]) ** 2).sum(axis=1)
        out.sigma2 = max(float(resid.mean()) / u.shape[1], 1e-12)
        out.meta["sigma2_fit"] = "train"
    return out


def compute_centroids(model: nn.Module, loader: Iterable[Any], tasks: list[str], device: Any = None,
                      meta: dict[str, Any] | None = None, val_loader: Iterable[Any] | None = None) -> TaskCentroids:
    """Run router + lift (eval mode, no grad) over ``loader`` ((x, target, task id) batches) and fit centroids;
    sigma^2 is fitted on ``val_loader``'s codes when given."""
    codes = collect_codes(model, loader, device)
    val = collect_codes(model, val_loader, device) if val_loader is not None else {}
    mw = mean_weights_per_task(codes["weights"], codes["task_ids"], len(tasks))
    info = {"num_samples": int(len(codes["z"])),
            "mean_weights": [[None if math.isnan(v) else float(v) for v in r] for r in mw], **(meta or {})}
    return fit_centroids(codes["z"], codes["task_ids"], tasks, info, val.get("z"), val.get("task_ids"))


def centroids_path(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / CENTROIDS_FILE


def load_run_centroids(run_dir: str | os.PathLike[str]) -> TaskCentroids:
    """The centroids stored in a run directory; FileNotFoundError saying how to compute them if absent."""
    path = centroids_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(
            f"no task centroids in {run_dir} ({CENTROIDS_FILE} is written at the end of MoLA-Router training; "
            f"this run predates it): compute them once with `mola predict --checkpoint {run_dir} --compute-centroids`"
            " or mola.task_inference.compute_run_centroids(run_dir)")
    return TaskCentroids.load(path)


def is_router_multitask(model: nn.Module) -> bool:
    """True for a MoLA-Router model whose samples carry one task each (centroids make sense)."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    enc = find_mola_model(model)
    single = getattr(model, "single_input", False)
    return enc is not None and enc.config.mode == "router" and enc.router is not None and not single


def write_run_centroids(model: nn.Module, dataset: Any, tasks: list[str], run_dir: str | os.PathLike[str],
                        batch_size: int = 256, device: Any = None, seed: int = 0,
                        meta: dict[str, Any] | None = None, val_dataset: Any = None) -> Path | None:
    """Compute centroids of ``model`` on ``dataset`` (the training split; sigma^2 on ``val_dataset``) and store
    them in ``run_dir``.

    Does nothing (returns None) for models without a router, single-input scenarios and non-zero DDP ranks.
    """
    if not is_router_multitask(model):
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None
    val = (sample_loader(val_dataset, batch_size, seed, MAX_SAMPLES) if val_dataset is not None and len(val_dataset)
           else None)
    cents = compute_centroids(model, sample_loader(dataset, batch_size, seed, MAX_SAMPLES), tasks, device,
                              {"split": "train", **(meta or {})}, val)
    return cents.save(centroids_path(run_dir))


def write_trained_centroids(trainer: Trainer) -> Path | None:
    """After ``Trainer.fit`` (model at the best checkpoint): store the run's task centroids (MoLA-Router on
    multi-input/domain data; nothing otherwise) for ``mola predict``. Called by ``mola train`` and ``sweep``."""
    return write_run_centroids(trainer.model, trainer.scenario.train, [t.name for t in trainer.tasks],
                               trainer.run_dir, trainer.cfg.data.eval_batch_size, trainer.device,
                               trainer.cfg.train.seed, {"checkpoint": "best", "best_epoch": trainer.best_epoch},
                               trainer.scenario.val)


def compute_run_centroids(run_dir: str | os.PathLike[str], device: str = "cpu", overrides: Sequence[str] = ()) -> Path:
    """Compute and store the centroids of a finished MoLA-Router run from its best checkpoint (older runs)."""
    run = load_run(run_dir, "best", device, overrides=overrides)
    cfg, scenario, model = run.cfg, run.scenario, run.model
    if not is_router_multitask(model):
        raise ValueError(f"{run_dir} is not a MoLA-Router run on multi-input/domain data: no task centroids to "
                         "compute (task inference from z needs model.mola.mode=router)")
    out = write_run_centroids(model, scenario.train, [t.name for t in scenario.tasks], run_dir_of(run_dir),
                              cfg.data.eval_batch_size, device, cfg.train.seed, {"checkpoint": "best"}, scenario.val)
    assert out is not None
    return out


def centroid_accuracy(model: nn.Module, centroids: TaskCentroids, loader: Iterable[Any],
                      device: Any = None) -> dict[str, Any]:
    """Nearest-centroid task inference on ``loader``: overall and per-task accuracy, mean confidence, majority rate."""
    codes = collect_codes(model, loader, device)
    t = codes["task_ids"]
    pred, conf = centroids.infer(codes["z"])
    counts = np.bincount(t, minlength=centroids.num_tasks)
    per_task = {name: (float((pred[t == k] == k).mean()) if counts[k] else None)
                for k, name in enumerate(centroids.tasks)}
    return {"accuracy": float((pred == t).mean()), "per_task": per_task, "mean_confidence": float(conf.mean()),
            "majority": float(counts.max() / counts.sum()), "num_samples": int(len(t))}


def evaluate_run(run_dir: str | os.PathLike[str], split: str = "test", device: str = "cpu",
                 recompute: bool = False) -> dict[str, Any]:
    """Task inference accuracy from z of a MoLA-Router run on ``split`` (centroids from its train split).

    Uses the stored centroids when present (and ``recompute`` is False); otherwise computes them without
    writing anything.
    """
    run = load_run(run_dir, "best", device)
    cfg, scenario, model = run.cfg, run.scenario, run.model
    if not is_router_multitask(model):
        raise ValueError(f"{run_dir} is not a MoLA-Router run on multi-input/domain data")
    tasks = [t.name for t in scenario.tasks]
    if centroids_path(run_dir_of(run_dir)).is_file() and not recompute:
        cents = load_run_centroids(run_dir_of(run_dir))
    else:
        bs = cfg.data.eval_batch_size
        cents = compute_centroids(model, sample_loader(scenario.train, bs, cfg.train.seed, MAX_SAMPLES), tasks,
                                  device, None, sample_loader(scenario.val, bs, cfg.train.seed, MAX_SAMPLES))
    ds = getattr(scenario, split)
    res = centroid_accuracy(model, cents, sample_loader(ds, cfg.data.eval_batch_size, cfg.train.seed), device)
    res.update({"run_dir": str(run_dir), "split": split, "twd_weight": cfg.model.mola.twd_weight})
    return res


__all__ = ["CENTROIDS_FILE", "TaskCentroids", "centroid_accuracy", "centroids_path", "compute_centroids",
           "compute_run_centroids", "evaluate_run", "fit_centroids", "is_router_multitask", "load_run_centroids",
           "write_run_centroids", "write_trained_centroids"]
