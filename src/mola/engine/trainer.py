"""One training loop for every architecture, weighting/gradient method and scenario.

Per step: model(x, task_ids) -> per-task outputs -> per-task mean losses (method.md §6) -> the method turns
them into gradients (plus the architecture's extra loss, e.g. lambda*TwD) -> optimizer step. Per epoch:
evaluation per task on val (and test), model selection on val only, best/last checkpoints, metrics.csv.
"""

from __future__ import annotations

import csv
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mola.data import build_scenario
from mola.data.base import Scenario
from mola.data.loaders import make_loaders
from mola.engine.checkpoint import atomic_save, load_checkpoint, rng_state, set_rng_state
from mola.engine.config import RunConfig, dump_config
from mola.engine.losses import split_targets, task_loss
from mola.methods import Method, StepContext, get_domain_method, get_weighting
from mola.metrics import HIGHER_IS_BETTER, delta_m, delta_p, make_meter, mean_over_tasks, primary_metric
from mola.models import build_model, num_parameters, task_rows
from mola.models.base import MultiTaskModel


class NonFiniteLossError(RuntimeError):
    """A task loss became NaN/inf; the message names the step, the task and the last good checkpoint."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def validate_names(cfg: RunConfig) -> None:
    """Fail fast, before any data is read, on an unknown data kind, arch, backbone, weighting or method."""
    import mola.data.layouts  # noqa: F401
    import mola.models.archs  # noqa: F401
    from mola.data.registry import SCENARIOS
    from mola.methods import DOMAIN_METHODS, WEIGHTINGS
    from mola.models import ARCHS, BACKBONES

    SCENARIOS.get(cfg.data.kind)
    ARCHS.get(cfg.model.arch)
    if not cfg.model.backbone.name.startswith("timm:"):
        BACKBONES.get(cfg.model.backbone.name)
    WEIGHTINGS.get(cfg.train.weighting)
    if cfg.train.method != "erm":
        DOMAIN_METHODS.get(cfg.train.method)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_optimizer(cfg: RunConfig, params: list[nn.Parameter], heterogeneity: str,
                    steps_total: int) -> tuple[torch.optim.Optimizer, Any]:
    """Per-scenario defaults (method.md §11): domain AdamW 1e-4, multi-input SGD 0.05 + cosine, single-input Adam."""
    o = cfg.optim
    defaults = {"domain": ("adamw", 1e-4, 1e-2, "none"), "multi_input": ("sgd", 0.05, 1e-4, "cosine"),
                "single_input": ("adam", 1e-4, 0.0, "none")}[heterogeneity]
    name = defaults[0] if o.name == "auto" else o.name
    lr = defaults[1] if o.lr is None else o.lr
    wd = (defaults[2] if o.name == "auto" else {"sgd": 1e-4, "adam": 0.0, "adamw": 1e-2}[name]) \
        if o.weight_decay is None else o.weight_decay
    if name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=wd)
    elif name == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=wd)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    sched_name = defaults[3] if o.scheduler == "auto" else o.scheduler
    sched = None
    if sched_name == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps_total))
    return opt, sched


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _set_epoch(loader: Any, epoch: int) -> None:
    for obj in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)


class Trainer:
    """Builds scenario, model, method and optimizer from a RunConfig and runs/evaluates/checkpoints them."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, scenario: Scenario | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        validate_names(cfg)
        self.device = resolve_device(cfg.train.device)
        seed_everything(cfg.train.seed)
        self.scenario = scenario or build_scenario(cfg.data)
        self.tasks = self.scenario.tasks
        self.loaders = make_loaders(self.scenario, cfg.data, cfg.train.seed)
        seed_everything(cfg.train.seed)
        self.model: MultiTaskModel = build_model(self.scenario, cfg.model).to(self.device)
        t = self.scenario.num_tasks
        self.weighting: Method = get_weighting(cfg.train.weighting, t, **cfg.train.weighting_options)
        self.domain: Method | None = None
        if cfg.train.method != "erm":
            if cfg.train.weighting != "ew":
                raise ValueError("combine a domain method (train.method) only with train.weighting=ew")
            self.domain = get_domain_method(cfg.train.method, t, feature_dim=self.model.feature_dim,
                                            **cfg.train.method_options)
        self.method = (self.domain or self.weighting).to(self.device)
        params = [p for p in list(self.model.parameters()) + list(self.method.parameters()) if p.requires_grad]
        self.steps_per_epoch = self._steps_per_epoch()
        self.optimizer, self.scheduler = build_optimizer(cfg, params, self.scenario.heterogeneity,
                                                         self.steps_per_epoch * cfg.train.epochs)
        shared = self.model.shared_parameters()
        ids = {id(p) for p in shared}
        self.shared_params = shared
        self.task_params = [p for p in params if id(p) not in ids]
        self.epoch = 0
        self.step = 0
        self.best_score = -math.inf
        self.best_epoch = -1
        self.history: list[dict[str, Any]] = []

    # -- bookkeeping ---------------------------------------------------------------------------------
    def _steps_per_epoch(self) -> int:
        n = len(self.loaders["train"])
        m = self.cfg.train.max_steps_per_epoch
        return min(n, m) if m else n

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def state(self) -> dict[str, Any]:
        return {
            "format": "mola-checkpoint",
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "rng": rng_state(),
        }

    def load_state(self, ckpt: dict[str, Any], training: bool = True) -> None:
        saved = ckpt["config"]
        mine = self.cfg.to_dict()
        for section in ("data", "model"):
            if saved.get(section) != mine.get(section):
                raise ValueError(f"checkpoint was written with another {section} config; it cannot be loaded here")
        self.model.load_state_dict(ckpt["model"])
        self.method.load_state_dict(ckpt["method"])
        if training:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scheduler is not None and ckpt["scheduler"] is not None:
                self.scheduler.load_state_dict(ckpt["scheduler"])
            self.epoch, self.step = ckpt["epoch"], ckpt["step"]
            self.best_score, self.best_epoch = ckpt["best_score"], ckpt["best_epoch"]
            self.history = list(ckpt["history"])
            set_rng_state(ckpt["rng"])

    def resume(self) -> None:
        self.load_state(load_checkpoint(self.ckpt_dir / "last.pt"))

    # -- steps ---------------------------------------------------------------------------------------
    def _forward_losses(self, x: Tensor, y: Any, t: Tensor) -> tuple[dict[int, Tensor], dict[int, Tensor], Any]:
        outputs = self.model(x, t)
        rows = None if self.model.single_input else task_rows(t, len(self.tasks))
        targets = split_targets(self.tasks, y, rows)
        losses = {k: task_loss(self.tasks[k], out, targets[k]) for k, out in outputs.items()}
        return outputs, losses, targets

    def train_epoch(self, progress: Any = None) -> dict[int, float]:
        self.model.train()
        self.method.train()
        loader = self.loaders["train"]
        _set_epoch(loader, self.epoch)
        sums = torch.zeros(len(self.tasks), dtype=torch.float64)
        counts = torch.zeros(len(self.tasks), dtype=torch.float64)
        amp = self.cfg.train.amp and self.device.type == "cuda"
        for i, (x, y, t) in enumerate(loader):
            if i >= self.steps_per_epoch:
                break
            x, y, t = _to(x, self.device), _to(y, self.device), _to(t, self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                outputs, losses, targets = self._forward_losses(x, y, t)
                extra = self.model.extra_loss()
            vals = torch.stack([v.detach().float() for v in losses.values()])
            if not bool(torch.isfinite(vals).all()):
                bad = [self.tasks[k].name for k, v in losses.items() if not torch.isfinite(v.detach())]
                if self.cfg.train.on_nonfinite == "skip":
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    continue
                last = self.ckpt_dir / "last.pt"
                raise NonFiniteLossError(
                    f"non-finite loss at epoch {self.epoch} step {self.step} for task(s) {bad}; last good "
                    f"checkpoint: {last if last.exists() else 'none'} (set train.on_nonfinite=skip to skip such steps)"
                )
            ctx = StepContext(model=self.model, shared_params=self.shared_params, task_params=self.task_params,
                              task_ids=t, num_tasks=len(self.tasks), features=self.model.features,
                              outputs=outputs, targets=targets, extra_loss=extra, epoch=self.epoch, step=self.step)
            self.optimizer.zero_grad(set_to_none=True)
            self.method.backward(losses, ctx)
            if self.cfg.optim.grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            for k, v in losses.items():
                sums[k] += float(v.detach())
                counts[k] += 1
            self.step += 1
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{float(vals.sum()):.3f}")
        means = {k: float(sums[k] / counts[k]) for k in range(len(self.tasks)) if counts[k] > 0}
        self.method.on_epoch_end(self.epoch, means)
        return means

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, dict[str, float]]:
        """Metrics per task on ``split`` ("val" or "test"), plus each task's mean loss."""
        self.model.eval()
        meters = [make_meter(task) for task in self.tasks]
        loss_sum = torch.zeros(len(self.tasks), dtype=torch.float64)
        loss_n = torch.zeros(len(self.tasks), dtype=torch.float64)
        for x, y, t in self.loaders[split]:
            x, y, t = _to(x, self.device), _to(y, self.device), _to(t, self.device)
            outputs, losses, targets = self._forward_losses(x, y, t)
            for k, out in outputs.items():
                meters[k].update(out.float(), targets[k])
                n = out.shape[0]
                loss_sum[k] += float(losses[k]) * n
                loss_n[k] += n
        results = {}
        for k, task in enumerate(self.tasks):
            if loss_n[k] == 0:
                continue
            res = meters[k].compute()
            res["loss"] = float(loss_sum[k] / loss_n[k])
            results[task.name] = res
        return results

    def select_score(self, val: dict[str, dict[str, float]]) -> float:
        """Higher is better. Default: mean accuracy if every task classifies, else minus the mean val loss."""
        key = self.cfg.train.select_metric
        if key == "auto":
            if all(t.kind == "classification" for t in self.tasks):
                key = "acc"
            else:
                return -float(np.mean([r["loss"] for r in val.values()]))
        vals = [r[key] for r in val.values() if key in r]
        if not vals:
            raise ValueError(f"train.select_metric {key!r} is not reported by any task")
        score = float(np.nanmean(vals))
        return score if HIGHER_IS_BETTER.get(key, True) else -score

    # -- the run -------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train for the configured epochs (from the current epoch on), write metrics, checkpoints, final.json."""
        from tqdm.auto import tqdm

        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(self.cfg, self.run_dir / "config.yaml")
        writer = _tensorboard(self.run_dir) if self.cfg.train.tensorboard else None
        total = self.cfg.train.epochs
        with tqdm(total=(total - self.epoch) * self.steps_per_epoch, disable=not self.cfg.train.progress,
                  desc=self.cfg.name, unit="step") as bar:
            while self.epoch < total:
                start = time.perf_counter()
                train_losses = self.train_epoch(bar)
                seconds = time.perf_counter() - start
                val = self.evaluate("val")
                score = self.select_score(val)
                row = {"epoch": self.epoch, "step": self.step, "seconds": round(seconds, 3),
                       "lr": self.optimizer.param_groups[0]["lr"], "select_score": score}
                row.update({f"train/{self.tasks[k].name}/loss": v for k, v in train_losses.items()})
                row.update({f"val/{tn}/{m}": v for tn, r in val.items() for m, v in r.items()})
                self.history.append(row)
                self.epoch += 1
                improved = score > self.best_score
                if improved:
                    self.best_score, self.best_epoch = score, self.epoch - 1
                state = self.state()
                atomic_save(state, self.ckpt_dir / "last.pt")
                if improved:
                    atomic_save(state, self.ckpt_dir / "best.pt")
                self._write_metrics()
                if writer is not None:
                    for k, v in row.items():
                        if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                            writer.add_scalar(k, v, self.epoch)
                    writer.flush()
        if writer is not None:
            writer.close()
        return self.finalize()

    def _write_metrics(self) -> None:
        keys: list[str] = []
        for row in self.history:
            keys += [k for k in row if k not in keys]
        tmp = self.run_dir / ".metrics.csv.tmp"
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(self.history)
        tmp.replace(self.run_dir / "metrics.csv")

    def finalize(self) -> dict[str, Any]:
        """Evaluate the last and the best (by val) checkpoints; write final.json."""
        last_val = self.evaluate("val")
        last_test = self.evaluate("test") if self.cfg.train.eval_test else {}
        best = load_checkpoint(self.ckpt_dir / "best.pt")
        self.model.load_state_dict(best["model"])
        val = self.evaluate("val")
        test = self.evaluate("test") if self.cfg.train.eval_test else {}
        final: dict[str, Any] = {
            "val": val, "test": test,
            "mean": {"val": mean_over_tasks(val), "test": mean_over_tasks(test) if test else {}},
            "best_epoch": self.best_epoch,
            "last": {
                "val": last_val,
                "test": last_test,
                "mean": {"val": mean_over_tasks(last_val), "test": mean_over_tasks(last_test) if last_test else {}},
            },
            "epochs": self.epoch,
            "seconds_per_epoch": float(np.mean([r["seconds"] for r in self.history])) if self.history else None,
            "parameters": num_parameters(self.model),
            "scenario": self.scenario.summary(),
            "arch": self.cfg.model.arch,
            "mode": self.cfg.model.mola.mode if self.cfg.model.arch == "mola" else None,
            "weighting": self.cfg.train.weighting, "method": self.cfg.train.method, "seed": self.cfg.train.seed,
        }
        if self.cfg.train.single_task_results and test:
            single = json.loads(Path(self.cfg.train.single_task_results).read_text())["test"]
            primary = {t.name: primary_metric(t) for t in self.tasks}
            mine = {n: {primary[n]: r[primary[n]]} for n, r in test.items()}
            ref = {n: {primary[n]: single[n][primary[n]]} for n in mine}
            final["delta_m"] = delta_m(mine, ref)
            final["delta_p"] = delta_p(mine, ref)
        tmp = self.run_dir / ".final.json.tmp"
        tmp.write_text(json.dumps(final, indent=2, default=float))
        tmp.replace(self.run_dir / "final.json")
        # leave the model at the best checkpoint, as evaluated
        return final


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but keep the loop usable without it
        return None
    return SummaryWriter(str(run_dir / "tb"))


def format_table(final: dict[str, Any], split: str = "test") -> str:
    """A per-task text table of the final metrics of ``split`` (plus the mean row)."""
    res = final[split] or final["val"]
    metrics: list[str] = []
    for r in res.values():
        metrics += [m for m in r if m not in metrics and m != "loss"]
    name_w = max([len("task"), len("mean")] + [len(n) for n in res])
    lines = [f"{'task':<{name_w}}  " + "  ".join(f"{m:>12}" for m in metrics)]
    for n, r in list(res.items()) + [("mean", mean_over_tasks(res))]:
        lines.append(f"{n:<{name_w}}  " + "  ".join(f"{r.get(m, float('nan')):>12.4f}" for m in metrics))
    return "\n".join(lines)
