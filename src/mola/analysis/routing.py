"""Router analyses (docs/concepts.md, docs/results.md, paper Fig. 6): mean mixing weights per task, codes z, and
how well the task can be read back from z (nearest task centroid accuracy, silhouette score, 2-D PCA projection).

Codes are L2-normalised before any distance is taken (u = z / ||z||, as the TwD loss sees them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mola.inject import find_mola_model


def _router_model(model: nn.Module) -> Any:
    enc = find_mola_model(model)
    if enc is None or enc.config.mode != "router" or enc.router is None:
        raise ValueError("routing analysis needs a MoLA-Router model (model.mola.mode=router)")
    return enc


def sample_loader(dataset: Any, batch_size: int, seed: int, max_samples: int | None = None) -> Any:
    """Ordered (unshuffled) loader over ``dataset``, or over a seeded random subset of ``max_samples`` of it."""
    from torch.utils.data import DataLoader, Subset

    n = len(dataset)
    if max_samples is not None and n > max_samples:
        g = torch.Generator().manual_seed(seed)
        dataset = Subset(dataset, torch.randperm(n, generator=g)[:max_samples].sort().values.tolist())
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def collect_codes(model: nn.Module, loader: Iterable[Any], device: torch.device | str | None = None,
                  max_samples: int | None = None) -> dict[str, np.ndarray]:
    """Run only routers + lifts over ``loader`` ((x, target, task_id) batches): weights (N, E) and code z (N, d)
    (several routers: mean weights, concatenated normalised codes), tasks (N,), router_weights (R, N, E)."""
    enc = _router_model(model)
    if device is None:
        device = next(enc.router.parameters()).device
    was_training = model.training
    model.eval()
    ws, zs, ts, per = [], [], [], []
    n = 0
    try:
        for batch in loader:
            x, t = batch[0], batch[-1]
            if not isinstance(x, Tensor):
                raise ValueError(f"routing analysis expects tensor inputs, got {type(x).__name__}")
            enc.set_routing(x.to(device))
            ws.append(enc.routing_weights().float().cpu())
            zs.append(enc.routing_code().float().cpu())
            per.append(torch.stack([r.weights for r in enc.routings]).float().cpu())
            ts.append(torch.as_tensor(t).long().reshape(-1).cpu())
            n += x.shape[0]
            if max_samples is not None and n >= max_samples:
                break
    finally:
        model.train(was_training)
    if not ws:
        raise ValueError("routing analysis got an empty loader")
    out = {"weights": torch.cat(ws).numpy(), "z": torch.cat(zs).numpy(), "task_ids": torch.cat(ts).numpy(),
           "router_weights": torch.cat(per, dim=1).numpy()}
    if max_samples is not None:
        out = {k: (v[:, :max_samples] if k == "router_weights" else v[:max_samples]) for k, v in out.items()}
    return out


def normalize_codes(z: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (zero rows stay zero)."""
    z = np.asarray(z, dtype=np.float64)
    norm = np.linalg.norm(z, axis=1, keepdims=True)
    return z / np.where(norm > 0, norm, 1.0)


def mean_weights_per_task(weights: np.ndarray, task_ids: np.ndarray, num_tasks: int) -> np.ndarray:
    """(T, E) mean mixing weight per task; rows of tasks without samples are nan."""
    return task_centroids(weights, task_ids, num_tasks)


def task_centroids(codes: np.ndarray, task_ids: np.ndarray, num_tasks: int) -> np.ndarray:
    """(T, d) mean code per task (nan rows for tasks without samples)."""
    codes = np.asarray(codes, dtype=np.float64)
    out = np.full((num_tasks, codes.shape[1]), np.nan)
    for t in range(num_tasks):
        sel = task_ids == t
        if sel.any():
            out[t] = codes[sel].mean(axis=0)
    return out


def predict_task(codes: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest (Euclidean) centroid per code; tasks with nan centroids are never chosen."""
    codes = np.asarray(codes, dtype=np.float64)
    d = ((codes[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)
    d = np.where(np.isnan(d), np.inf, d)
    return d.argmin(axis=1)


def task_inference_accuracy(train_codes: np.ndarray, train_tasks: np.ndarray, eval_codes: np.ndarray,
                            eval_tasks: np.ndarray, num_tasks: int, normalize: bool = True) -> float:
    """Share of eval codes whose nearest train-split task centroid is their own task (ties: lowest task id)."""
    if len(eval_codes) == 0:
        return math.nan
    if normalize:
        train_codes, eval_codes = normalize_codes(train_codes), normalize_codes(eval_codes)
    cents = task_centroids(train_codes, np.asarray(train_tasks), num_tasks)
    return float((predict_task(eval_codes, cents) == np.asarray(eval_tasks)).mean())


def silhouette(codes: np.ndarray, task_ids: np.ndarray, normalize: bool = True, max_samples: int = 5000,
               seed: int = 0) -> float:
    """sklearn silhouette score of the codes labelled by task (nan with fewer than 2 tasks or too few samples)."""
    from sklearn.metrics import silhouette_score

    codes = normalize_codes(codes) if normalize else np.asarray(codes, dtype=np.float64)
    labels = np.asarray(task_ids)
    k = len(np.unique(labels))
    if k < 2 or k >= len(labels):
        return math.nan
    size = min(max_samples, len(labels)) if len(labels) > max_samples else None
    return float(silhouette_score(codes, labels, sample_size=size, random_state=seed))


def pca_2d(codes: np.ndarray, normalize: bool = True) -> tuple[np.ndarray, list[float]]:
    """2-D PCA projection of the codes and the explained-variance ratio of the two components."""
    from sklearn.decomposition import PCA

    codes = normalize_codes(codes) if normalize else np.asarray(codes, dtype=np.float64)
    k = min(2, codes.shape[0], codes.shape[1])
    if k == 0:
        return np.zeros((codes.shape[0], 2)), [0.0, 0.0]
    pca = PCA(n_components=k).fit(codes)
    proj = pca.transform(codes)
    ratio = [float(v) for v in np.nan_to_num(pca.explained_variance_ratio_)]
    if k < 2:
        proj = np.concatenate([proj, np.zeros((proj.shape[0], 2 - k))], axis=1)
        ratio += [0.0] * (2 - k)
    return proj, ratio


def routing_summary(train: dict[str, np.ndarray], evals: dict[str, np.ndarray], num_tasks: int,
                    task_names: list[str] | None = None, router_names: list[str] | None = None) -> dict[str, Any]:
    """Numbers of Fig. 6 from codes of the train split (centroids) and an eval split (everything else); with
    several routers also each router's mean weights (``router_mean_weights``, in ``router_names`` order).

    Single-input scenarios (task id -1 on every sample) get only the overall mean weights.
    """
    names = task_names or [str(t) for t in range(num_tasks)]
    w, t = evals["weights"], evals["task_ids"]
    ent = -(np.clip(w, 1e-12, 1.0) * np.log(np.clip(w, 1e-12, 1.0))).sum(axis=1)
    out: dict[str, Any] = {
        "num_experts": int(w.shape[1]), "code_dim": int(evals["z"].shape[1]), "num_eval": int(len(t)),
        "num_train": int(len(train["task_ids"])), "tasks": names,
        "overall_mean_weights": w.mean(axis=0).tolist(),
        "mean_weight_entropy": float(ent.mean()), "max_entropy": float(math.log(w.shape[1])),
        "codes": "z / ||z|| (as the TwD loss sees them)",
    }
    per_router = evals.get("router_weights")
    if per_router is not None and len(per_router) > 1:
        out["router_names"] = list(router_names or [str(i) for i in range(len(per_router))])
        out["router_overall_mean_weights"] = [rw.mean(axis=0).tolist() for rw in per_router]
    if (t < 0).all():
        out["per_task"] = False
        out["note"] = "single-input scenario: every sample carries every task, no per-task routing statistics"
        return out
    counts = np.bincount(t[t >= 0], minlength=num_tasks)
    out.update({
        "per_task": True,
        "mean_weights": [[None if np.isnan(v) else float(v) for v in row]
                         for row in mean_weights_per_task(w, t, num_tasks)],
        "task_inference_accuracy": task_inference_accuracy(train["z"], train["task_ids"], evals["z"], t, num_tasks),
        "chance_accuracy": float(counts.max() / max(1, counts.sum())),
        "silhouette": silhouette(evals["z"], t),
        "eval_counts": counts.tolist(),
    })
    if "router_names" in out:
        out["router_mean_weights"] = [[[None if np.isnan(v) else float(v) for v in row]
                                       for row in mean_weights_per_task(rw, t, num_tasks)] for rw in per_router]
    return out


__all__ = ["collect_codes", "mean_weights_per_task", "normalize_codes", "pca_2d", "predict_task", "routing_summary",
           "sample_loader", "silhouette", "task_centroids", "task_inference_accuracy"]
