"""Task conflict on shared weights: cosines of per-task mean loss gradients, per layer, per stage and overall.

For K batches, each task's loss gradient on the shared weights W0 is taken separately (one forward, one
backward per task). From the (K*T)x(K*T) Gram matrix of those gradients, per level, follow: the cosine of
two tasks' mean gradients over the K batches, a bootstrap interval over batches, the fraction of batches
whose own cosine is negative, and the norm ratio of the mean gradients (docs/conflict.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import default_collate

from mola.inject.targets import find_stages, resolve_targets
from mola.layers import MoLALayer
from mola.tasks import Scenario

ALL = "ALL"
STAGE = "stage:"
NOT_SHARED_GROUPS = ("adapters", "router", "lift")
"""Parameter groups that are never W0, even where a mode shares them (MoLA-Router's adapters)."""
CSV_COLUMNS = ("layer", "task_a", "task_b", "cosine", "ci_low", "ci_high", "neg_fraction", "norm_ratio", "n")
MAX_GRADIENT_BYTES = 4 * 2**30

LossFn = Callable[[Any], dict[int, Tensor]]
"""batch -> per-task mean losses (task index -> scalar), computed with the model in its current state."""


@dataclass
class ConflictResult:
    """Per level, the (K, T, K, T) float64 Gram matrix of the per-batch task gradients; what the tables read."""

    tasks: list[str]
    grams: dict[str, np.ndarray]
    sizes: dict[str, int]  # parameters per level

    @property
    def num_batches(self) -> int:
        return next(iter(self.grams.values())).shape[0] if self.grams else 0

    def levels(self) -> list[str]:
        return list(self.grams)

    def rows(self, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
        """One row per level and task pair (a < b) with ``CSV_COLUMNS``."""
        out = []
        for level, gram in self.grams.items():
            st = pair_statistics(gram, confidence, n_boot, seed)
            t = len(self.tasks)
            for a in range(t):
                for b in range(a + 1, t):
                    out.append({"layer": level, "task_a": self.tasks[a], "task_b": self.tasks[b],
                                "cosine": st["cosine"][a, b], "ci_low": st["ci_low"][a, b],
                                "ci_high": st["ci_high"][a, b], "neg_fraction": st["neg_fraction"][a, b],
                                "norm_ratio": st["norm_ratio"][a, b], "n": self.num_batches})
        return out

    def cosine_matrix(self, level: str) -> np.ndarray:
        """(T, T) cosines of the mean gradients at ``level`` (diagonal 1 where a gradient exists)."""
        return mean_gradient_cosines(self.grams[level])


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def mean_gradient_cosines(gram: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Cosines (T, T) of the tasks' (weighted) mean gradients from a (K, T, K, T) Gram matrix; ``weights``
    (B, K) gives B resampled means at once, shape (B, T, T)."""
    k = gram.shape[0]
    w = np.ones((1, k)) if weights is None else np.asarray(weights, dtype=np.float64)
    inner = np.einsum("ni,iajb,nj->nab", w, gram, w)
    diag = np.sqrt(np.clip(np.einsum("naa->na", inner), 0.0, None))
    cos = _safe_div(inner, diag[:, :, None] * diag[:, None, :])
    return cos[0] if weights is None else cos


def pair_statistics(gram: np.ndarray, confidence: float = 0.95, n_boot: int = 2000,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """(T, T) arrays: cosine of mean gradients, its basic-bootstrap interval over the K batches (nan for
    K < 2; clipped to [-1, 1]), fraction of batches whose own cosine is negative, and ||mean g_a|| / ||mean g_b||."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    k, t = gram.shape[0], gram.shape[1]
    cos = mean_gradient_cosines(gram)
    inner = gram.sum(axis=(0, 2))  # K^2 times the mean gradients' inner products: the ratio is the same
    norms = np.sqrt(np.clip(np.diag(inner), 0.0, None))
    ratio = _safe_div(norms[:, None], np.broadcast_to(norms[None, :], (t, t)))
    per_batch = np.stack([gram[i, :, i, :] for i in range(k)])  # (K, T, T)
    d = np.sqrt(np.clip(np.einsum("kaa->ka", per_batch), 0.0, None))
    batch_cos = _safe_div(per_batch, d[:, :, None] * d[:, None, :])
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(batch_cos)
        neg = _safe_div((batch_cos < 0).sum(0).astype(np.float64), valid.sum(0).astype(np.float64))
    low = np.full((t, t), np.nan)
    high = np.full((t, t), np.nan)
    if k >= 2 and n_boot > 0:
        rng = np.random.default_rng(seed)
        weights = rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot).astype(np.float64)
        boot = mean_gradient_cosines(gram, weights)
        alpha = (1.0 - confidence) / 2
        with np.errstate(invalid="ignore"):
            if np.isfinite(boot).any():
                # basic (reverse-percentile) bootstrap: resamples repeat batches, which adds noise to the means
                # and pulls their cosine towards 0; reflecting the quantiles around the estimate undoes that
                # bias, where plain percentiles could leave the estimate outside its own interval
                low = np.clip(2 * cos - np.nanquantile(boot, 1.0 - alpha, axis=0), -1.0, 1.0)
                high = np.clip(2 * cos - np.nanquantile(boot, alpha, axis=0), -1.0, 1.0)
    return {"cosine": cos, "ci_low": low, "ci_high": high, "neg_fraction": neg, "norm_ratio": ratio}


# -- which parameters form which level -------------------------------------------------------------------------
def find_backbone(model: nn.Module) -> tuple[str, nn.Module | None]:
    """The outermost submodule whose stages ``find_stages`` knows (e.g. ``encoder`` or ``encoder.model``)."""
    for name, mod in model.named_modules():
        if mod is model:
            continue
        try:
            find_stages(mod)
        except ValueError:
            continue
        return name, mod
    return "", None


def _under(names: Sequence[str], prefix: str) -> list[str]:
    return [n for n in names if n.startswith(prefix + ".")]


def conflict_levels(model: nn.Module, target_modules: str | list[str] = "last_stage") -> dict[str, list[str]]:
    """Level name -> names of the shared W0 parameters it covers: each MoLA target layer (the model's MoLA
    layers, or for other archs the layers ``target_modules`` selects in the backbone), each backbone stage
    (``stage:<name>``) and ``ALL`` (every shared weight: adapters, router and lift excluded)."""
    groups = model.parameter_groups() if hasattr(model, "parameter_groups") else {"backbone": list(model.parameters())}
    shared_fn = getattr(model, "shared_parameters", None)
    shared_ids = {id(p) for p in (shared_fn() if callable(shared_fn) else model.parameters()) if p.requires_grad}
    excluded = {id(p) for g in NOT_SHARED_GROUPS for p in groups.get(g, [])}
    names = [n for n, p in model.named_parameters() if id(p) in shared_ids and id(p) not in excluded]
    if not names:
        raise ValueError(f"{type(model).__name__} has no shared trainable weights: there is nothing tasks could "
                         "conflict on")
    prefix, backbone = find_backbone(model)
    levels: dict[str, list[str]] = {}
    mola_layers = [n for n, m in model.named_modules() if isinstance(m, MoLALayer)]
    if mola_layers:
        layer_names = mola_layers
    elif backbone is not None:
        try:
            layer_names = [f"{prefix}.{n}" for n in resolve_targets(backbone, target_modules)]
        except ValueError:
            layer_names = []
    else:
        layer_names = []
    strip = len(prefix) + 1 if prefix else 0
    for full in layer_names:
        params = _under(names, full)
        if params:
            key = full[strip:] if full.startswith(prefix + ".") else full
            levels[key] = params
    if backbone is not None:
        stages, _ = find_stages(backbone)
        for stage in stages:
            params = _under(names, f"{prefix}.{stage}")
            if params:
                levels[f"{STAGE}{stage}"] = params
    levels[ALL] = names
    return levels


# -- the measurement ---------------------------------------------------------------------------------------------
def measure_conflict(model: nn.Module, loss_fn: LossFn, batches: Sequence[Any], levels: dict[str, list[str]],
                     tasks: list[str], progress: bool = False,
                     max_bytes: int = MAX_GRADIENT_BYTES) -> ConflictResult:
    """Per batch, one ``loss_fn`` forward and one backward per task onto the ``levels``' parameters; the model's
    state (parameters, buffers, train/eval mode, .grad) is left as it was."""
    if not batches:
        raise ValueError("measuring conflict needs at least one batch")
    named = dict(model.named_parameters())
    order = list(dict.fromkeys(n for ps in levels.values() for n in ps))
    missing = [n for n in order if n not in named]
    if missing:
        raise ValueError(f"conflict levels name parameters the model does not have: {missing[:3]}")
    params = [named[n] for n in order]
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    t = len(tasks)
    need = len(batches) * t * total * 4
    if need > max_bytes:
        raise ValueError(f"measuring conflict would keep {need / 2**30:.1f} GiB of gradients ({len(batches)} "
                         f"batches x {t} tasks x {total:,} shared weights); use fewer batches (--batches) or "
                         f"fewer tasks")
    grads = torch.zeros(len(batches), t, total, dtype=torch.float32)
    from tqdm.auto import tqdm

    for i, batch in enumerate(tqdm(batches, desc="conflict", unit="batch", disable=not progress, leave=False)):
        losses = loss_fn(batch)
        bad = [tasks[k] for k, v in losses.items() if not bool(torch.isfinite(v.detach()).all())]
        if bad:
            raise ValueError(f"non-finite loss for task(s) {', '.join(bad)} in conflict batch {i}: the gradients "
                             "are undefined (check the data or the checkpoint)")
        present = sorted(losses)
        for j, k in enumerate(present):
            g = torch.autograd.grad(losses[k], params, retain_graph=j + 1 < len(present), allow_unused=True)
            grads[i, k] = torch.cat([(x if x is not None else torch.zeros_like(p)).detach().reshape(-1).float().cpu()
                                     for x, p in zip(g, params, strict=True)])
    # one float64 Gram per parameter (a slice at a time, no copy of the whole matrix); a level's Gram is the sum
    # of its parameters' Grams, so the weights shared by a layer, its stage and ALL are multiplied once
    flat = grads.reshape(len(batches) * t, total)
    per_param = {}
    for n, x in zip(order, flat.split(sizes, dim=1), strict=True):
        x = x.double()
        per_param[n] = (x @ x.T).numpy()
    shape = (len(batches), t, len(batches), t)
    grams = {level: sum(per_param[n] for n in pnames).reshape(shape) for level, pnames in levels.items()}
    level_sizes = {level: sum(named[n].numel() for n in pnames) for level, pnames in levels.items()}
    return ConflictResult(list(tasks), grams, level_sizes)


def conflict_batches(scenario: Scenario, num_batches: int, batch_size: int, seed: int = 0) -> list[list[int]]:
    """``num_batches`` index lists into the training split: balanced mixed batches (``batch_size // T`` rows
    of each task, at least 2; without replacement within a batch) for domain/multi-input data, plain random
    batches of ``batch_size`` for single-input data (every task's loss on every row)."""
    if num_batches < 1:
        raise ValueError(f"the number of conflict batches must be >= 1, got {num_batches}")
    if batch_size < 1:
        raise ValueError(f"the conflict batch size must be >= 1, got {batch_size}")
    rng = np.random.default_rng(seed)
    train = scenario.train
    if scenario.heterogeneity == "single_input":
        n = len(train)
        return [rng.choice(n, size=min(batch_size, n), replace=False).tolist() for _ in range(num_batches)]
    ids = np.asarray(train.task_ids)
    per_task = max(2, batch_size // scenario.num_tasks)
    rows = [np.flatnonzero(ids == k) for k in range(scenario.num_tasks)]
    empty = [scenario.tasks[k].name for k, r in enumerate(rows) if len(r) == 0]
    if empty:
        raise ValueError(f"task(s) {', '.join(empty)} have no training rows: no conflict can be measured for them")
    return [np.concatenate([rng.choice(r, size=min(per_task, len(r)), replace=False) for r in rows]).tolist()
            for _ in range(num_batches)]


def model_conflict(model: nn.Module, scenario: Scenario, num_batches: int = 8, batch_size: int = 128, seed: int = 0,
                   target_modules: str | list[str] = "last_stage", device: torch.device | str = "cpu",
                   progress: bool = False) -> ConflictResult:
    """``measure_conflict`` of a MultiTaskModel on ``conflict_batches`` of the scenario's training split, in
    train mode (batch statistics, as training sees them) with BatchNorm buffers and the RNG restored after."""
    from mola.engine.evaluate import forward_losses, to_device

    device = torch.device(device)
    tasks = scenario.tasks
    data = scenario.train
    index = conflict_batches(scenario, num_batches, batch_size, seed)
    levels = conflict_levels(model, target_modules)

    def load(rows: list[int]) -> Any:
        return default_collate([data[i] for i in rows])

    def loss_fn(batch: Any) -> dict[int, Tensor]:
        x, y, t = (to_device(v, device) for v in batch)  # single-input rows carry task id ALL_TASKS
        return forward_losses(model, tasks, x, y, t)[1]

    was_training = model.training
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            model.train()
            return measure_conflict(model, loss_fn, [load(r) for r in index], levels, [t.name for t in tasks],
                                    progress)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])


def summary_columns(result: ConflictResult, pairs: bool = True) -> dict[str, float]:
    """Flat values for metrics.csv / TensorBoard: per level the mean and min pair cosine; for ``ALL`` also
    each pair (``conflict/ALL/<a>|<b>``)."""
    out: dict[str, float] = {}
    t = len(result.tasks)
    iu = np.triu_indices(t, 1)
    for level in result.levels():
        cos = result.cosine_matrix(level)[iu]
        finite = cos[np.isfinite(cos)]
        out[f"conflict/{level}/mean_cosine"] = float(finite.mean()) if finite.size else math.nan
        out[f"conflict/{level}/min_cosine"] = float(finite.min()) if finite.size else math.nan
        if pairs and level == ALL:
            for a, b, c in zip(iu[0], iu[1], cos, strict=True):
                out[f"conflict/{ALL}/{result.tasks[a]}|{result.tasks[b]}"] = float(c)
    return out


__all__ = ["ALL", "CSV_COLUMNS", "ConflictResult", "conflict_batches", "conflict_levels", "find_backbone",
           "mean_gradient_cosines", "measure_conflict", "model_conflict", "pair_statistics", "summary_columns"]
