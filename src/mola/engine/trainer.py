"""One training loop for every architecture, weighting/gradient method and scenario.

Per step: model(x, task_ids) -> per-task outputs -> per-task mean losses (docs/methods/weighting.md) -> the method turns
them into gradients (plus the architecture's extra loss, e.g. lambda*TwD) -> optimizer step. Per epoch:
evaluation per task on val (and test), model selection on val only, best/last checkpoints, metrics.csv.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mola.data import build_scenario
from mola.data.loaders import make_loaders, set_loader_position
from mola.data.validate import missing_eval_rows, require_nonempty, validate_scenario
from mola.engine.checkpoint import (
    RunLock,
    checkpoint_path,
    fault_point,
    load_latest,
    remove_stale_temp_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mola.engine.config import RunConfig, check_values, dump_config
from mola.engine.distributed import init_distributed, shard_loaders, wrap_ddp
from mola.engine.evaluate import evaluate, forward_losses, host_batch
from mola.engine.logs import RunningMeans, epoch_line, tensorboard, write_curves, write_metrics
from mola.engine.run import RESUME_FREE_KEYS, absolute_root, check_compatible, config_diff, load_run, load_tensors
from mola.engine.selection import (
    INVALID_SELECTION,
    NonFiniteLossError,
    NonFiniteMetricError,
    check_select_metric,
    check_single_task_results,
    deltas_against_single_task,
    select_score,
    selection_label,
)
from mola.engine.setup import (
    build_optimizer,
    check_resume_epochs,
    replan_schedule,
    resolve_device,
    seed_everything,
    validate_names,
)
from mola.files import write_text
from mola.methods import Method, StepContext, get_domain_method, get_weighting
from mola.metrics import mean_over_tasks
from mola.models import build_model, num_parameters
from mola.models.base import MultiTaskModel
from mola.tasks import Scenario

CURVES_EVERY_S = 30.0
"""curves.png is redrawn after an epoch at most this often while training, and once at the end."""


def _loss_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


@dataclass
class _EpochSums:
    """What one epoch accumulates: per-task loss sums (device) and step counts (host), and the running means of
    the current logging interval (losses, method outputs)."""

    sums: Tensor
    counts: Tensor
    interval: RunningMeans
    method_interval: RunningMeans


class Trainer:
    """Builds scenario, model, method and optimizer from a RunConfig and runs/evaluates/checkpoints them."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, scenario: Scenario | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        check_values(cfg)  # configs built in code skip load_config
        validate_names(cfg)
        if cfg.model.arch == "single_task":
            raise ValueError("model.arch single_task trains one separate run per task: use "
                             "mola.engine.fit_single_task (mola train does), or arch single_task_joint for the "
                             "T networks trained together on one mixed batch")
        cfg.data.root = absolute_root(cfg.data.root)  # stored absolute: eval/analyze/predict work from anywhere
        self.dist = init_distributed(resolve_device(cfg.train.device))  # torchrun: one process per rank
        self.device = self.dist.device
        seed_everything(cfg.train.seed)
        self.scenario = validate_scenario(scenario) if scenario is not None else build_scenario(cfg.data)
        require_nonempty(self.scenario, "train", "val")
        self.missing_eval = missing_eval_rows(self.scenario, cfg.train.eval_test, cfg.train.allow_missing_eval)
        if self.missing_eval:
            warnings.warn(f"train.allow_missing_eval: {self.missing_eval} are trained on but not evaluated there "
                          "(left out of selection and the means; final.json records them)", RuntimeWarning,
                          stacklevel=2)
        self.tasks = self.scenario.tasks
        self.loaders = shard_loaders(make_loaders(self.scenario, cfg.data, cfg.train.seed), self.dist)
        seed_everything(cfg.train.seed)
        self.model: MultiTaskModel = build_model(self.scenario, cfg.model).to(self.device)
        num_tasks = self.scenario.num_tasks
        self.weighting: Method = get_weighting(cfg.train.weighting, num_tasks, **cfg.train.weighting_options)
        self.domain: Method | None = None
        if cfg.train.method != "erm":  # validate_names: a domain method combines only with weighting ew
            self.domain = get_domain_method(cfg.train.method, num_tasks, feature_dim=self.model.feature_dim,
                                            **cfg.train.method_options)
        self.method = (self.domain or self.weighting).to(self.device)
        params = [p for p in list(self.model.parameters()) + list(self.method.parameters()) if p.requires_grad]
        self.steps_per_epoch = self._steps_per_epoch()
        self.optimizer, self.scheduler = build_optimizer(cfg, params, self.scenario.heterogeneity,
                                                         self.steps_per_epoch * cfg.train.epochs, self.steps_per_epoch)
        shared = self.model.shared_parameters()
        ids = {id(p) for p in shared}
        self.shared_params = shared
        self.task_params = [p for p in params if id(p) not in ids]
        self.params = params
        # DDP (docs/distributed.md): loss-based methods use DDP's gradient hooks; gradient methods back-propagate
        # several times, so their forward runs under no_sync and every gradient is averaged after the step
        self.ddp = wrap_ddp(self.model, self.dist) if self.dist.enabled else None
        self._manual_sync = self.ddp is not None and self.method.needs != "losses"
        self.epoch = 0
        self.step = 0
        self.best_score = -math.inf
        self.best_epoch = -1
        self.history: list[dict[str, Any]] = []
        self.batch_in_epoch = 0  # batches of epoch ``self.epoch`` already trained (a mid-epoch checkpoint)
        self._epoch_loss: tuple[Tensor, Tensor] | None = None  # per-task loss sums/counts of those batches
        self.skipped_steps = 0
        self._method_epoch = RunningMeans()  # the method's outputs (task weights, ...) over the epoch
        self._skips_in_a_row = 0
        check_select_metric(cfg.train.select_metric, self.tasks)
        check_single_task_results(cfg.train.single_task_results, self.tasks)
        if cfg.train.select_on == "test_loss":
            warnings.warn(f"train.select_on={INVALID_SELECTION}", RuntimeWarning, stacklevel=2)

    # -- bookkeeping ---------------------------------------------------------------------------------
    def _last_good(self) -> str:
        last = checkpoint_path(self.run_dir, "last")
        return str(last) if last.exists() else "none"

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
            "position": {"epoch": self.epoch, "batch": self.batch_in_epoch},
            "epoch_loss": list(self._epoch_loss) if self._epoch_loss is not None else None,
            "skipped_steps": self.skipped_steps,
            "method_log": self._method_epoch.state() if self.batch_in_epoch else None,
        }

    def load_state(self, ckpt: dict[str, Any], training: bool = True) -> None:
        """Load a checkpoint (``load_checkpoint``'s dict): the model and method, and with ``training`` the
        optimizer, scheduler, counters, sampler position and RNG states. A checkpoint of another data/model
        config (or whose tensors do not fit this model) is a ValueError listing the differences."""
        where = ckpt.get("path", "checkpoint")
        saved = ckpt["config"]
        changed = check_compatible(saved, self.cfg.to_dict(), where)
        if training:
            check_resume_epochs(ckpt, self.cfg.train.epochs, str(where))
        load_tensors(self.model, ckpt["model"], f"checkpoint {where}", "model")
        load_tensors(self.method, ckpt["method"], f"checkpoint {where}", "method")
        if training:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scheduler is not None and ckpt["scheduler"] is not None:
                self.scheduler.load_state_dict(ckpt["scheduler"])
            notice = replan_schedule(self.scheduler, self.steps_per_epoch * self.cfg.train.epochs,
                                     int((saved.get("train") or {}).get("epochs", self.cfg.train.epochs)),
                                     self.cfg.train.epochs, str(where))
            if notice:
                warnings.warn(notice, RuntimeWarning, stacklevel=2)
            self.epoch, self.step = ckpt["epoch"], ckpt["step"]
            self.best_score, self.best_epoch = ckpt["best_score"], ckpt["best_epoch"]
            self.history = list(ckpt["history"])
            set_rng_state(ckpt["rng"])
            position = ckpt.get("position") or {"epoch": self.epoch, "batch": 0}
            self.batch_in_epoch = int(position["batch"]) if int(position["epoch"]) == self.epoch else 0
            loss = ckpt.get("epoch_loss")
            self._epoch_loss = (loss[0], loss[1]) if loss is not None and self.batch_in_epoch else None
            self.skipped_steps = int(ckpt.get("skipped_steps", 0))
            self._method_epoch.load(ckpt.get("method_log") if self.batch_in_epoch else None)
            if changed:
                warnings.warn(f"resuming {where} with changed settings ({'; '.join(changed)}): the result will "
                              "differ from an uninterrupted run", RuntimeWarning, stacklevel=2)

    def resume(self) -> Path:
        """Continue from the run directory's ``last`` checkpoint (the previous one, with a warning, if the newest
        is corrupt); returns the file loaded."""
        ckpt = load_latest(self.run_dir)
        self.load_state(ckpt)
        return Path(ckpt["path"])

    def save(self, which: str | tuple[str, ...] = "last") -> list[Path]:
        """Write the current state as checkpoint(s) ``which`` ("last", "best") of the run directory; under DDP
        only rank 0 writes (and returns the paths) and every rank waits until the files are in place."""
        bad = [n for n, v in self.model.state_dict().items()
               if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise NonFiniteLossError(
                f"model weights became non-finite at epoch {self.epoch} step {self.step} ({len(bad)} tensor(s): "
                f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); not writing them as a checkpoint. "
                f"Last good checkpoint: {self._last_good()} (lower optim.lr or set optim.grad_clip)")
        paths = save_checkpoint(self.state(), self.run_dir, which) if self.dist.is_main else []
        self.dist.barrier()
        return paths

    def _extra_name(self) -> str:
        return "twd" if self.cfg.model.arch == "mola" else "extra_loss"

    # -- steps ---------------------------------------------------------------------------------------
    def _forward_losses(self, x: Tensor, y: Any, task_ids: Tensor,
                        outputs: dict[int, Tensor] | None = None) -> tuple[dict[int, Tensor], dict[int, Tensor], Any]:
        return forward_losses(self.model, self.tasks, x, y, task_ids, outputs)

    def _log_interval(self, progress: Any, losses: RunningMeans, method: RunningMeans, writer: Any) -> None:
        """Every ``train.log_every_steps`` steps: read the running means once (one host sync), show the loss on
        the progress bar and write losses and method outputs (task weights, ...) to TensorBoard."""
        values = {f"train/{self.tasks[int(k)].name}/loss": v for k, v in losses.read().items()}
        values.update({f"method/{k}": v for k, v in method.read().items()})
        if progress is not None and values:
            progress.set_postfix(loss=f"{sum(v for k, v in values.items() if k.endswith('/loss')):.3f}")
        if writer is not None:
            for k, v in values.items():
                writer.add_scalar(f"step/{k}", v, self.step)

    def train_epoch(self, progress: Any = None, writer: Any = None) -> dict[int, float]:
        """One epoch (from the current batch on); returns each task's mean training loss. Task groups are
        computed on the host and loss sums and method outputs stay on the device: one step costs one host sync
        on an accelerator, the finite-loss check (a gradient method adds its Gram matrix; docs/performance.md)."""
        self.model.train()
        self.method.train()
        loader = self.loaders["train"]
        first = self.batch_in_epoch
        set_loader_position(loader, self.epoch, first)
        acc = self._epoch_accumulators()
        for i, batch in enumerate(loader if first < self.steps_per_epoch else (), start=first):
            if i >= self.steps_per_epoch:
                break
            if not self._train_step(i, batch, acc):
                continue
            self.step += 1
            if progress is not None:
                progress.update(1)
            self._after_step(i, acc, progress, writer)
        self.batch_in_epoch, self._epoch_loss = 0, None
        total = acc.sums.tolist()  # the epoch's one read of the loss sums
        means = {k: total[k] / float(acc.counts[k]) for k in range(len(self.tasks)) if acc.counts[k] > 0}
        self.method.on_epoch_end(self.epoch, means)
        return means

    def _epoch_accumulators(self) -> _EpochSums:
        """Per-task loss sums (on the device) and step counts, continued from a mid-epoch checkpoint."""
        acc = _EpochSums(torch.zeros(len(self.tasks), dtype=_loss_dtype(self.device), device=self.device),
                         torch.zeros(len(self.tasks), dtype=torch.float64), RunningMeans(), RunningMeans())
        if self._epoch_loss is not None:
            acc.sums.copy_(self._epoch_loss[0])
            acc.counts.copy_(self._epoch_loss[1])
        return acc

    def _forward(self, x: Tensor, y: Any, task_ids: Tensor) -> tuple[dict[int, Tensor], dict[int, Tensor], Any, Any]:
        """(outputs, per-task losses, targets, extra loss) of one batch; under DDP the global-batch means."""
        amp = self.cfg.train.amp and self.device.type == "cuda"
        sync = self.ddp.no_sync() if self._manual_sync else nullcontext()
        with sync, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            if self.ddp is not None:  # DDP: forward and extra loss (TwD on the global batch's codes) together
                outs, extra = self.ddp(x, task_ids, self.dist.gather_rows)
                outputs, losses, targets = self._forward_losses(x, y, task_ids, outputs=outs)
            else:
                outputs, losses, targets = self._forward_losses(x, y, task_ids)
                extra = self.model.extra_loss()
        losses = self.dist.global_losses(losses, targets, self.tasks)  # DDP: global-batch means
        return outputs, losses, targets, extra

    def _train_step(self, i: int, batch: Any, acc: _EpochSums) -> bool:
        """Forward, finite check, method backward and optimizer step on batch ``i``; False if it was skipped."""
        x, y, task_ids = host_batch(self.model, batch, self.device)
        buffers = ([b.detach().clone() for b in self.model.buffers()]
                   if self.cfg.train.on_nonfinite == "skip" else None)  # to undo a skipped step's BN stats
        outputs, losses, targets, extra = self._forward(x, y, task_ids)
        named = [v.detach().float() for v in losses.values()]
        if extra is not None:  # the architecture's extra loss (lambda * TwD) is checked like the task losses
            named.append(extra.detach().float().reshape(()))
        if not bool(torch.isfinite(torch.stack(named)).all()):  # the step's one host sync
            self._skip_nonfinite(i, losses, extra, buffers)
            return False
        self._skips_in_a_row = 0
        ctx = StepContext(model=self.model, shared_params=self.shared_params, task_params=self.task_params,
                          task_ids=task_ids, num_tasks=len(self.tasks), features=self.model.features,
                          outputs=outputs, targets=targets, extra_loss=extra, epoch=self.epoch, step=self.step,
                          dist=self.dist if self.dist.enabled else None)
        self.optimizer.zero_grad(set_to_none=True)
        logged = self.method.backward(losses, ctx)
        if self.ddp is not None:  # DDP averaged the model's gradients, except under no_sync
            self.dist.average_gradients(self.params if self._manual_sync
                                        else [p for p in self.method.parameters() if p.requires_grad])
        if self.cfg.optim.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        for k, v in losses.items():  # on the device: read once per logging interval and per epoch
            acc.sums[k] += v.detach().to(acc.sums.dtype)
            acc.counts[k] += 1
        acc.interval.add({str(k): v for k, v in losses.items()})
        acc.method_interval.add(logged or {})
        self._method_epoch.add(logged or {})
        return True

    def _skip_nonfinite(self, i: int, losses: dict[int, Tensor], extra: Tensor | None,
                        buffers: list[Tensor] | None) -> None:
        """A non-finite loss on batch ``i``: skip the step (``train.on_nonfinite=skip``, undoing its BN statistics)
        or raise a NonFiniteLossError naming the tasks and the last good checkpoint."""
        bad = [self.tasks[k].name for k, v in losses.items() if not torch.isfinite(v.detach())]
        if extra is not None and not bool(torch.isfinite(extra.detach()).all()):
            bad.append(f"{self._extra_name()} (the architecture's extra loss)")
        where = f"epoch {self.epoch} step {self.step} (batch {i})"
        limit = self.cfg.train.max_consecutive_skips
        if self.cfg.train.on_nonfinite != "skip":
            raise NonFiniteLossError(
                f"non-finite loss at {where} for task(s) {', '.join(bad)}; last good checkpoint: {self._last_good()} "
                "(resume from it with `mola train --resume`, or set train.on_nonfinite=skip to skip such steps)")
        if self._skips_in_a_row + 1 >= max(1, limit):
            raise NonFiniteLossError(
                f"non-finite loss at {where} for task(s) {', '.join(bad)}: {self._skips_in_a_row + 1} steps in a row "
                f"were non-finite (train.max_consecutive_skips={limit}), so skipping cannot help; last good "
                f"checkpoint: {self._last_good()} (lower optim.lr, set optim.grad_clip, or check the data)")
        if self.ddp is not None and not self._manual_sync:  # DDP waits for the backward of a forward
            torch.stack([v.float() for v in losses.values()]).sum().mul(0.0).backward()
        self.optimizer.zero_grad(set_to_none=True)
        for b, old in zip(self.model.buffers(), buffers or [], strict=True):
            b.copy_(old)
        self.step += 1
        self.skipped_steps += 1
        self._skips_in_a_row += 1
        warnings.warn(f"skipped step {self.step - 1} (epoch {self.epoch}, batch {i}): non-finite loss for task(s) "
                      f"{', '.join(bad)} (train.on_nonfinite=skip)", RuntimeWarning, stacklevel=3)

    def _after_step(self, i: int, acc: _EpochSums, progress: Any, writer: Any) -> None:
        """Every ``train.log_every_steps``: log the interval's means; every ``train.checkpoint_every_steps``: a
        mid-epoch ``last`` checkpoint (not after the epoch's final batch: the epoch end writes one)."""
        log_every, every = self.cfg.train.log_every_steps, self.cfg.train.checkpoint_every_steps
        if log_every and self.step % log_every == 0:
            self._log_interval(progress, acc.interval, acc.method_interval, writer)
        if every and self.step % every == 0 and i + 1 < self.steps_per_epoch:
            self.batch_in_epoch, self._epoch_loss = i + 1, (acc.sums, acc.counts)
            self.save("last")

    def evaluate(self, split: str, progress: bool = False) -> dict[str, dict[str, float]]:
        """Metrics per task on ``split`` ("val" or "test"), plus each task's mean loss."""
        return evaluate(self.model, self.loaders[split], self.tasks, self.device,
                        self.dist if self.dist.enabled else None, progress, split)

    def select_score(self, val: dict[str, dict[str, float]], epoch: int | None = None) -> float:
        """Higher is better (``selection.select_score``); a non-finite val metric raises or is dropped."""
        return select_score(val, self.tasks, self.cfg.train, self.epoch if epoch is None else epoch,
                            self._last_good())

    def conflict_columns(self) -> dict[str, float]:
        """Every ``train.log_conflict_every`` epochs (on the main process): the task conflict on the shared
        weights at the current weights (``conflict/<level>/mean_cosine``, ...); the RNG, BatchNorm buffers and
        the training batches are left as they were, so a run with it trains the same weights as without."""
        every = self.cfg.train.log_conflict_every
        if not every or (self.epoch + 1) % every or not self.dist.is_main:
            return {}
        from mola.engine.conflict import model_conflict, summary_columns

        cfg = self.cfg
        result = model_conflict(self.model, self.scenario, cfg.train.conflict_batches, cfg.data.batch_size,
                                seed=cfg.train.seed + self.epoch, target_modules=cfg.model.mola.target_modules,
                                device=self.device)
        return summary_columns(result)

    # -- the run -------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train for the configured epochs (from the current epoch on), write metrics, checkpoints, final.json.

        The run folder is locked (``RunLock``) for the whole run: a second run into it is refused."""
        with RunLock(self.run_dir) if self.dist.is_main else nullcontext():
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        main = self.dist.is_main  # under DDP only rank 0 writes files (docs/distributed.md)
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(self.run_dir)
            dump_config(self.cfg, self.run_dir / "config.yaml")
        writer = tensorboard(self.run_dir) if self.cfg.train.tensorboard and main else None
        total = self.cfg.train.epochs
        self._curves_at = time.perf_counter()
        with tqdm(total=max(0, (total - self.epoch) * self.steps_per_epoch - self.batch_in_epoch),
                  disable=not (self.cfg.train.progress and main),
                  desc=self.cfg.name, unit="step") as bar:
            while self.epoch < total:
                bar.set_description(f"{self.cfg.name} epoch {self.epoch + 1}/{total}")
                start = time.perf_counter()
                train_losses = self.train_epoch(bar, writer)
                row, score = self._epoch_row(time.perf_counter() - start, train_losses)
                self.history.append(row)
                self.epoch += 1
                improved = score > self.best_score or self.best_epoch < 0  # the score is finite (select_score)
                if improved:
                    self.best_score = score
                    self.best_epoch = self.epoch - 1
                self.save(("last", "best") if improved else "last")
                self._log_epoch(row, improved, bar, writer)
                if self._stop_early(bar):
                    break
        if writer is not None:
            writer.close()
        if main:
            write_curves(self.history, [t.name for t in self.tasks], self.run_dir / "curves.png")
        return self.finalize()

    def _epoch_row(self, seconds: float, train_losses: dict[int, float]) -> tuple[dict[str, Any], float]:
        """The epoch's metrics.csv row (train losses, method outputs, val metrics, conflict) and its selection
        score."""
        val = self.evaluate("val")
        test = self.evaluate("test") if self.cfg.train.select_on == "test_loss" else None
        score = self.select_score(val) if test is None else -float(np.mean([r["loss"] for r in test.values()]))
        row = {"epoch": self.epoch, "step": self.step, "seconds": round(seconds, 3),
               "lr": self.optimizer.param_groups[0]["lr"], "select_score": score,
               "selected_on": selection_label(self.cfg)}
        row.update({f"train/{self.tasks[k].name}/loss": v for k, v in train_losses.items()})
        row.update({f"method/{k}": v for k, v in self._method_epoch.read().items()})
        row.update({f"val/{tn}/{m}": v for tn, r in val.items() for m, v in r.items()})
        row.update({f"test/{tn}/loss": r["loss"] for tn, r in (test or {}).items()})
        row.update(self.conflict_columns())
        return row, score

    def _log_epoch(self, row: dict[str, Any], improved: bool, bar: Any, writer: Any) -> None:
        """metrics.csv, the epoch line, curves.png (at most every ``CURVES_EVERY_S``) and TensorBoard."""
        if self.dist.is_main:
            write_metrics(self.history, self.run_dir)
            fault_point("metrics.written")
            bar.write(epoch_line(row, [t.name for t in self.tasks], self.cfg.train.epochs, improved), file=sys.stderr)
            if time.perf_counter() - self._curves_at > CURVES_EVERY_S:  # a plot costs ~0.3 s: not every epoch
                write_curves(self.history, [t.name for t in self.tasks], self.run_dir / "curves.png")
                self._curves_at = time.perf_counter()
        if writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    writer.add_scalar(k, v, self.epoch)
            writer.flush()

    def _stop_early(self, bar: Any) -> bool:
        """``train.early_stopping`` epochs without a better selection score: stop (and say so)."""
        patience = self.cfg.train.early_stopping
        if not patience or self.epoch - 1 - self.best_epoch < patience:
            return False
        if self.dist.is_main:
            bar.write(f"early stopping: no better selection score for {patience} epochs (best: epoch "
                      f"{self.best_epoch + 1}; train.early_stopping={patience})", file=sys.stderr)
        return True

    def finalize(self) -> dict[str, Any]:
        """Evaluate the last and the best (by val) checkpoints; write final.json."""
        last_val = self.evaluate("val")
        last_test = self.evaluate("test") if self.cfg.train.eval_test else {}
        load_run(self.run_dir, "best", scenario=self.scenario, model=self.model)
        val = self.evaluate("val")
        test = self.evaluate("test") if self.cfg.train.eval_test else {}
        final: dict[str, Any] = {
            "val": val, "test": test,
            "mean": {"val": mean_over_tasks(val), "test": mean_over_tasks(test) if test else {}},
            "best_epoch": self.best_epoch,
            "selection": {"on": self.cfg.train.select_on, "valid_protocol": self.cfg.train.select_on == "val",
                          "note": selection_label(self.cfg)},
            "last": {
                "val": last_val,
                "test": last_test,
                "mean": {"val": mean_over_tasks(last_val), "test": mean_over_tasks(last_test) if last_test else {}},
            },
            "epochs": self.epoch,
            "stopped_early": self.epoch < self.cfg.train.epochs,
            "seconds_per_epoch": float(np.mean([r["seconds"] for r in self.history])) if self.history else None,
            "parameters": num_parameters(self.model),
            "trainable_parameters": sum(p.numel() for p in self.params),
            "scenario": self.scenario.summary(),
            "arch": self.cfg.model.arch,
            "mode": self.cfg.model.mola.mode if self.cfg.model.arch == "mola" else None,
            "weighting": self.cfg.train.weighting, "method": self.cfg.train.method, "seed": self.cfg.train.seed,
        }
        if self.missing_eval:
            final["missing_eval"] = self.missing_eval
        if self.cfg.train.single_task_results and test:
            final.update(deltas_against_single_task(test, self.tasks, self.cfg.train.single_task_results))
        if self.dist.is_main:
            write_text(json.dumps(final, indent=2, default=float), self.run_dir / "final.json")
            fault_point("final.written")
        # leave the model at the best checkpoint, as evaluated
        return final


__all__ = ["RESUME_FREE_KEYS", "NonFiniteLossError", "NonFiniteMetricError", "Trainer", "build_optimizer",
           "config_diff", "resolve_device", "selection_label", "validate_names"]
