"""One training loop for every architecture, weighting/gradient method and scenario.

Per step: model(x, task_ids) -> per-task outputs -> per-task mean losses (method.md §6) -> the method turns
them into gradients (plus the architecture's extra loss, e.g. lambda*TwD) -> optimizer step. Per epoch:
evaluation per task on val (and test), model selection on val only, best/last checkpoints, metrics.csv.
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import random
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mola.data import build_scenario
from mola.data.base import Scenario
from mola.data.loaders import make_loaders, set_loader_position
from mola.data.validate import require_nonempty, validate_scenario
from mola.engine.checkpoint import (
    RunLock,
    checkpoint_path,
    fault_point,
    load_checkpoint,
    load_latest,
    remove_stale_temp_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mola.engine.config import RunConfig, check_values, dump_config
from mola.engine.distributed import init_distributed, shard_loaders, wrap_ddp
from mola.engine.losses import split_targets, task_loss
from mola.methods import Method, StepContext, get_domain_method, get_weighting
from mola.metrics import HIGHER_IS_BETTER, delta_m, delta_p, make_meter, mean_over_tasks, primary_metric
from mola.models import build_model, num_parameters, task_rows
from mola.models.base import MultiTaskModel

INVALID_SELECTION = ("test_loss: NOT a valid protocol - the checkpoint was selected on the test split's loss "
                     "(as the paper's released code did), so its test scores are optimistic")
"""What every output of a ``train.select_on: test_loss`` run says about its model selection."""


def selection_label(cfg: RunConfig) -> str:
    """How the best checkpoint was chosen, for metrics.csv, final.json and the CLI line."""
    return INVALID_SELECTION if cfg.train.select_on == "test_loss" else f"val ({cfg.train.select_metric})"


class NonFiniteLossError(RuntimeError):
    """A task loss became NaN/inf; the message names the step, the task and the last good checkpoint."""


class NonFiniteMetricError(NonFiniteLossError):
    """A validation loss or selection metric is NaN/inf; the message names the task, epoch, split and metric."""


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
    if cfg.train.method != "erm" and cfg.train.method not in DOMAIN_METHODS:
        from mola.engine.config import SHORTHANDS

        if cfg.train.method in SHORTHANDS:
            raise ValueError(f"train.method {cfg.train.method!r} is a --method shorthand (it sets model.arch/"
                             "model.mola.mode); in a config file set model.arch: mola and model.mola.mode instead")
        valid = ["erm", *SHORTHANDS, *DOMAIN_METHODS.names()]
        close = difflib.get_close_matches(cfg.train.method, valid, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown method {cfg.train.method!r} (--method / train.method).{hint} "
                         f"Valid names: {', '.join(valid)}")


def resolve_device(name: str, what: str = "train.device") -> torch.device:
    """``auto`` -> cuda if available, else cpu; any other name must parse and exist here (ValueError naming it)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"{what} {name!r} is not a device name (use auto, cpu, cuda, cuda:N or mps)") from err
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"{what} {name!r}: no CUDA GPU is available here (use cpu or auto)")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{what} {name!r}: this machine has {n} CUDA GPU(s), cuda:0..cuda:{n - 1}")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{what} {name!r}: MPS is not available here (use cpu or auto)")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{what} {name!r}: mola runs on cpu, cuda or mps")
    return dev


def build_optimizer(cfg: RunConfig, params: list[nn.Parameter], heterogeneity: str,
                    steps_total: int, steps_per_epoch: int = 1) -> tuple[torch.optim.Optimizer, Any]:
    """Per-scenario defaults (method.md §11): domain AdamW 1e-4, multi-input SGD 0.05 + cosine, single-input Adam.
    The scheduler steps once per optimizer step (``step``: every ``step_epochs * steps_per_epoch`` steps)."""
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
    elif sched_name == "step":
        if o.step_epochs < 1 or not 0.0 < o.step_gamma <= 1.0:
            raise ValueError(f"optim.step_epochs must be >= 1 and optim.step_gamma in (0, 1], got {o.step_epochs} "
                             f"and {o.step_gamma}")
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=o.step_epochs * max(1, steps_per_epoch),
                                                gamma=o.step_gamma)
    return opt, sched


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


RESUME_FREE_KEYS = ("train.epochs", "train.progress", "train.tensorboard", "train.device", "train.eval_test",
                    "train.checkpoint_every_steps", "train.on_nonfinite", "train.single_task_results",
                    "train.max_consecutive_skips", "train.on_nonfinite_metric")
"""Settings a resumed run may change without a warning (they do not change the trained weights)."""


def config_diff(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """``"dotted.key: saved -> now"`` for every leaf that differs between two nested config dicts."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out: list[str] = []
        for k in list(saved) + [k for k in now if k not in saved]:
            out += config_diff(saved.get(k, "<absent>"), now.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    if isinstance(saved, tuple) or isinstance(now, tuple):
        saved, now = (list(v) if isinstance(v, tuple) else v for v in (saved, now))
    return [] if saved == now else [f"{prefix[:-1]}: {saved!r} -> {now!r}"]


def _load_tensors(module: nn.Module, state: dict[str, Tensor], where: str, what: str) -> None:
    """``module.load_state_dict(state)``, or a ValueError listing missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{name} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
                 if keys]
        raise ValueError(f"{where} does not fit this {what}; " + "; ".join(parts))
    module.load_state_dict(state)


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
        self.dist = init_distributed(resolve_device(cfg.train.device))  # torchrun: one process per rank
        self.device = self.dist.device
        seed_everything(cfg.train.seed)
        self.scenario = validate_scenario(scenario) if scenario is not None else build_scenario(cfg.data)
        require_nonempty(self.scenario, "train", "val")
        self.tasks = self.scenario.tasks
        self.loaders = shard_loaders(make_loaders(self.scenario, cfg.data, cfg.train.seed), self.dist)
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
        self._skips_in_a_row = 0
        self._check_select_metric()
        self._check_single_task_results()
        if cfg.train.select_on == "test_loss":
            warnings.warn(f"train.select_on={INVALID_SELECTION}", RuntimeWarning, stacklevel=2)

    # -- bookkeeping ---------------------------------------------------------------------------------
    def _check_select_metric(self) -> None:
        """``train.select_metric`` must be reported by some task: checked here, not after the first epoch."""
        key = self.cfg.train.select_metric
        if key == "auto":
            return
        reported = {"loss"}
        for task in self.tasks:
            try:
                reported |= set(make_meter(task).compute())
            except Exception:  # noqa: BLE001 - a meter that cannot compute empty: its names are unknown here
                return
        if key not in reported:
            raise ValueError(f"train.select_metric {key!r} is not reported by any task of this scenario; "
                             f"valid: {', '.join(sorted(reported))}")

    def _check_single_task_results(self) -> None:
        """``train.single_task_results`` must be a readable final.json with test metrics for every task: checked
        here, not after all the training."""
        ref = self.cfg.train.single_task_results
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
        missing = [t.name for t in self.tasks if not isinstance(single, dict) or not isinstance(
            single.get(t.name), dict) or primary_metric(t) not in single[t.name]]
        if missing:
            metrics = "/".join(sorted({primary_metric(t) for t in self.tasks}))
            raise ValueError(f"train.single_task_results {p} has no test {metrics} for task(s) {', '.join(missing)}")

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
        }

    def load_state(self, ckpt: dict[str, Any], training: bool = True) -> None:
        """Load a checkpoint (``load_checkpoint``'s dict): the model and method, and with ``training`` the
        optimizer, scheduler, counters, sampler position and RNG states. A checkpoint of another data/model
        config (or whose tensors do not fit this model) is a ValueError listing the differences."""
        where = ckpt.get("path", "checkpoint")
        saved, mine = ckpt["config"], self.cfg.to_dict()
        diffs = config_diff({k: saved.get(k) for k in ("data", "model")}, {k: mine[k] for k in ("data", "model")})
        if diffs:
            sections = sorted({d.split(".", 1)[0] for d in diffs})
            raise ValueError(f"checkpoint {where} was written with another {' and '.join(sections)} config; it "
                             f"cannot be loaded here. Differences (checkpoint -> now): {'; '.join(diffs)}")
        _load_tensors(self.model, ckpt["model"], f"checkpoint {where}", "model")
        _load_tensors(self.method, ckpt["method"], f"checkpoint {where}", "method")
        if training:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scheduler is not None and ckpt["scheduler"] is not None:
                self.scheduler.load_state_dict(ckpt["scheduler"])
            self.epoch, self.step = ckpt["epoch"], ckpt["step"]
            self.best_score, self.best_epoch = ckpt["best_score"], ckpt["best_epoch"]
            self.history = list(ckpt["history"])
            set_rng_state(ckpt["rng"])
            position = ckpt.get("position") or {"epoch": self.epoch, "batch": 0}
            self.batch_in_epoch = int(position["batch"]) if int(position["epoch"]) == self.epoch else 0
            loss = ckpt.get("epoch_loss")
            self._epoch_loss = (loss[0], loss[1]) if loss is not None and self.batch_in_epoch else None
            self.skipped_steps = int(ckpt.get("skipped_steps", 0))
            changed = [d for d in config_diff({k: saved.get(k) for k in ("train", "optim")},
                                              {k: mine[k] for k in ("train", "optim")})
                       if d.split(":", 1)[0] not in RESUME_FREE_KEYS]
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
    def _forward_losses(self, x: Tensor, y: Any, t: Tensor,
                        outputs: dict[int, Tensor] | None = None) -> tuple[dict[int, Tensor], dict[int, Tensor], Any]:
        if outputs is None:
            outputs = self.model(x, t)
        rows = None if self.model.single_input else task_rows(t, len(self.tasks))
        targets = split_targets(self.tasks, y, rows)
        losses = {k: task_loss(self.tasks[k], out, targets[k]) for k, out in outputs.items()}
        return outputs, losses, targets

    def train_epoch(self, progress: Any = None) -> dict[int, float]:
        self.model.train()
        self.method.train()
        loader = self.loaders["train"]
        first = self.batch_in_epoch
        set_loader_position(loader, self.epoch, first)
        if self._epoch_loss is not None:
            sums, counts = (v.clone() for v in self._epoch_loss)
        else:
            sums = torch.zeros(len(self.tasks), dtype=torch.float64)
            counts = torch.zeros(len(self.tasks), dtype=torch.float64)
        amp = self.cfg.train.amp and self.device.type == "cuda"
        every = self.cfg.train.checkpoint_every_steps
        for i, (x, y, t) in enumerate(loader if first < self.steps_per_epoch else (), start=first):
            if i >= self.steps_per_epoch:
                break
            x, y, t = _to(x, self.device), _to(y, self.device), _to(t, self.device)
            buffers = ([b.detach().clone() for b in self.model.buffers()]
                       if self.cfg.train.on_nonfinite == "skip" else None)  # to undo a skipped step's BN stats
            sync = self.ddp.no_sync() if self._manual_sync else nullcontext()
            with sync, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                if self.ddp is not None:  # DDP: forward and extra loss (TwD on the global batch's codes) together
                    outs, extra = self.ddp(x, t, self.dist.gather_rows)
                    outputs, losses, targets = self._forward_losses(x, y, t, outputs=outs)
                else:
                    outputs, losses, targets = self._forward_losses(x, y, t)
                    extra = self.model.extra_loss()
            losses = self.dist.global_losses(losses, targets, self.tasks)  # DDP: global-batch means
            named = [v.detach().float() for v in losses.values()]
            if extra is not None:  # the architecture's extra loss (lambda * TwD) is checked like the task losses
                named.append(extra.detach().float().reshape(()))
            vals = torch.stack(named)
            if not bool(torch.isfinite(vals).all()):
                bad = [self.tasks[k].name for k, v in losses.items() if not torch.isfinite(v.detach())]
                if extra is not None and not bool(torch.isfinite(extra.detach()).all()):
                    bad.append(f"{self._extra_name()} (the architecture's extra loss)")
                if self.cfg.train.on_nonfinite == "skip" and \
                        self._skips_in_a_row + 1 < max(1, self.cfg.train.max_consecutive_skips):
                    if self.ddp is not None and not self._manual_sync:  # DDP waits for the backward of a forward
                        torch.stack([v.float() for v in losses.values()]).sum().mul(0.0).backward()
                    self.optimizer.zero_grad(set_to_none=True)
                    for b, old in zip(self.model.buffers(), buffers or [], strict=True):
                        b.copy_(old)
                    self.step += 1
                    self.skipped_steps += 1
                    self._skips_in_a_row += 1
                    warnings.warn(f"skipped step {self.step - 1} (epoch {self.epoch}, batch {i}): non-finite loss "
                                  f"for task(s) {', '.join(bad)} (train.on_nonfinite=skip)", RuntimeWarning,
                                  stacklevel=2)
                    continue
                if self.cfg.train.on_nonfinite == "skip":
                    raise NonFiniteLossError(
                        f"non-finite loss at epoch {self.epoch} step {self.step} (batch {i}) for task(s) "
                        f"{', '.join(bad)}: {self._skips_in_a_row + 1} steps in a row were non-finite "
                        f"(train.max_consecutive_skips={self.cfg.train.max_consecutive_skips}), so skipping "
                        f"cannot help; last good checkpoint: {self._last_good()} (lower optim.lr, set "
                        "optim.grad_clip, or check the data)")
                raise NonFiniteLossError(
                    f"non-finite loss at epoch {self.epoch} step {self.step} (batch {i}) for task(s) "
                    f"{', '.join(bad)}; last good checkpoint: {self._last_good()} "
                    "(resume from it with `mola train --resume`, or set train.on_nonfinite=skip to skip such steps)"
                )
            self._skips_in_a_row = 0
            ctx = StepContext(model=self.model, shared_params=self.shared_params, task_params=self.task_params,
                              task_ids=t, num_tasks=len(self.tasks), features=self.model.features,
                              outputs=outputs, targets=targets, extra_loss=extra, epoch=self.epoch, step=self.step,
                              dist=self.dist if self.dist.enabled else None)
            self.optimizer.zero_grad(set_to_none=True)
            self.method.backward(losses, ctx)
            if self.ddp is not None:  # DDP averaged the model's gradients, except under no_sync
                self.dist.average_gradients(self.params if self._manual_sync
                                            else [p for p in self.method.parameters() if p.requires_grad])
            if self.cfg.optim.grad_clip is not None:
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
            if every and self.step % every == 0 and i + 1 < self.steps_per_epoch:
                self.batch_in_epoch, self._epoch_loss = i + 1, (sums, counts)
                self.save("last")
        self.batch_in_epoch, self._epoch_loss = 0, None
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
        if self.dist.enabled:  # DDP: each rank saw a slice of the split; merge them (same results on every rank)
            meters = self.dist.merge_meters(meters)
            loss_sum, loss_n = self.dist.all_reduce_sum(loss_sum), self.dist.all_reduce_sum(loss_n)
        results = {}
        for k, task in enumerate(self.tasks):
            if loss_n[k] == 0:
                continue
            res = meters[k].compute()
            res["loss"] = float(loss_sum[k] / loss_n[k])
            results[task.name] = res
        return results

    def select_score(self, val: dict[str, dict[str, float]], epoch: int | None = None) -> float:
        """Higher is better. Default: mean accuracy if every task classifies, else minus the mean val loss.

        A task whose val loss or selection metric is NaN/inf raises NonFiniteMetricError naming the task, epoch
        and split; with ``train.on_nonfinite_metric: drop`` it is left out of the score with a warning."""
        key = self.cfg.train.select_metric
        if key == "auto":
            key = "acc" if all(t.kind == "classification" for t in self.tasks) else "loss"
        epoch = self.epoch if epoch is None else epoch
        if not any(key in r for r in val.values()):
            raise ValueError(f"train.select_metric {key!r} is not reported by any task")
        bad = {name: (m, r[m]) for name, r in val.items() for m in dict.fromkeys(("loss", key))
               if m in r and not math.isfinite(r[m])}
        if bad:
            what = "; ".join(f"task {n!r}: val {m} = {v}" for n, (m, v) in bad.items())
            if self.cfg.train.on_nonfinite_metric != "drop" or len(bad) == len(val):
                raise NonFiniteMetricError(
                    f"non-finite validation metric at epoch {epoch} (split val): {what}; the best-on-val "
                    f"checkpoint cannot be chosen. Last good checkpoint: {self._last_good()}"
                    + ("" if len(bad) == len(val) else
                       " (set train.on_nonfinite_metric=drop to leave such tasks out of the selection score)"))
            warnings.warn(f"epoch {epoch}: leaving task(s) {', '.join(repr(n) for n in bad)} out of the selection "
                          f"score (non-finite: {what}; train.on_nonfinite_metric=drop)", RuntimeWarning,
                          stacklevel=2)
        vals = [r[key] for n, r in val.items() if key in r and n not in bad]
        score = float(np.mean(vals))
        return score if HIGHER_IS_BETTER.get(key, key != "loss") else -score

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
        writer = _tensorboard(self.run_dir) if self.cfg.train.tensorboard and main else None
        total = self.cfg.train.epochs
        with tqdm(total=max(0, (total - self.epoch) * self.steps_per_epoch - self.batch_in_epoch),
                  disable=not (self.cfg.train.progress and main),
                  desc=self.cfg.name, unit="step") as bar:
            while self.epoch < total:
                start = time.perf_counter()
                train_losses = self.train_epoch(bar)
                seconds = time.perf_counter() - start
                val = self.evaluate("val")
                test = self.evaluate("test") if self.cfg.train.select_on == "test_loss" else None
                score = self.select_score(val) if test is None else -float(np.mean([r["loss"] for r in test.values()]))
                row = {"epoch": self.epoch, "step": self.step, "seconds": round(seconds, 3),
                       "lr": self.optimizer.param_groups[0]["lr"], "select_score": score,
                       "selected_on": selection_label(self.cfg)}
                row.update({f"train/{self.tasks[k].name}/loss": v for k, v in train_losses.items()})
                row.update({f"val/{tn}/{m}": v for tn, r in val.items() for m, v in r.items()})
                row.update({f"test/{tn}/loss": r["loss"] for tn, r in (test or {}).items()})
                self.history.append(row)
                self.epoch += 1
                improved = score > self.best_score or self.best_epoch < 0  # the score is finite (select_score)
                if improved:
                    self.best_score = score
                    self.best_epoch = self.epoch - 1
                self.save(("last", "best") if improved else "last")
                if main:
                    self._write_metrics()
                    fault_point("metrics.written")
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
        best = load_checkpoint(checkpoint_path(self.run_dir, "best"))
        self.model.load_state_dict(best["model"])
        from mola.task_inference import write_run_centroids  # MoLA-Router: task centroids of z, for `mola predict`

        write_run_centroids(self.model, self.scenario.train, [t.name for t in self.tasks], self.run_dir,
                            self.cfg.data.eval_batch_size, self.device, self.cfg.train.seed,
                            {"checkpoint": "best", "best_epoch": self.best_epoch}, self.scenario.val)
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
        if self.dist.is_main:
            tmp = self.run_dir / ".final.json.tmp"
            tmp.write_text(json.dumps(final, indent=2, default=float))
            tmp.replace(self.run_dir / "final.json")
            fault_point("final.written")
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
