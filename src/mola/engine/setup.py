"""Building a run's parts from its config: name checks, seeding, the device and the optimizer."""

from __future__ import annotations

import difflib
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from mola.engine.config import SHORTHANDS, RunConfig


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (initialisation, sampling order, methods)."""
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
        if cfg.train.method in SHORTHANDS:
            raise ValueError(f"train.method {cfg.train.method!r} is a --method shorthand (it sets model.arch/"
                             "model.mola.mode); in a config file set model.arch: mola and model.mola.mode instead")
        valid = [*SHORTHANDS, "erm", *(n for n in DOMAIN_METHODS.names() if n != "erm")]
        close = difflib.get_close_matches(cfg.train.method, valid, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown method {cfg.train.method!r} (--method / train.method).{hint} "
                         f"Valid names: {', '.join(valid)}")
    if cfg.train.method != "erm" and cfg.train.weighting != "ew":
        raise ValueError(f"domain method {cfg.train.method} combines only with weighting ew, not "
                         f"{cfg.train.weighting} (train.method / train.weighting)")


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
    """Per-scenario defaults (docs/paper.md): domain AdamW 1e-4, multi-input SGD 0.05 + cosine, single-input Adam.
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
    sched: torch.optim.lr_scheduler.LRScheduler | None = None
    if sched_name == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps_total))
    elif sched_name == "step":
        if o.step_epochs < 1 or not 0.0 < o.step_gamma <= 1.0:
            raise ValueError(f"optim.step_epochs must be >= 1 and optim.step_gamma in (0, 1], got {o.step_epochs} "
                             f"and {o.step_gamma}")
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=o.step_epochs * max(1, steps_per_epoch),
                                                gamma=o.step_gamma)
    return opt, sched


def epochs_trained(ckpt: dict[str, Any]) -> int:
    """Epochs a checkpoint has trained, counting a started epoch (a mid-epoch checkpoint) as trained."""
    done = int(ckpt["epoch"])
    position = ckpt.get("position") or {}
    started = int(position.get("batch", 0)) > 0 and int(position.get("epoch", done)) == done
    return done + int(started)


def check_resume_epochs(ckpt: dict[str, Any], epochs: int, where: str) -> None:
    """Refuse a resume to ``epochs`` (``train.epochs``) that the checkpoint cannot honestly continue to: fewer
    epochs than it has trained, or more epochs after its cosine schedule has reached its end (lr 0: the extra
    epochs would train nothing, and climbing back up would not be the schedule that was asked for)."""
    trained = epochs_trained(ckpt)
    if epochs < trained:
        raise ValueError(f"checkpoint {where} has trained {trained} epoch(s); resuming with train.epochs={epochs} "
                         f"would throw trained epochs away. A resume keeps or raises train.epochs (>= {trained}); "
                         "to use an earlier state, train a new run into another --out")
    sched = ckpt.get("scheduler")
    if epochs > int(ckpt["epoch"]) and isinstance(sched, dict) and "T_max" in sched \
            and int(sched["last_epoch"]) >= int(sched["T_max"]):
        raise ValueError(f"checkpoint {where} finished its cosine schedule (lr annealed to its minimum at epoch "
                         f"{ckpt['epoch']}); resuming to train.epochs={epochs} would train the extra epochs at that "
                         "lr, and restarting the cosine is not the schedule that was planned. Train a new run with "
                         f"train.epochs={epochs} into another --out (or use optim.scheduler=step or none, whose "
                         "runs can be extended)")


def replan_schedule(scheduler: Any, steps_total: int, saved_epochs: int, epochs: int, where: str) -> str | None:
    """Fit a loaded scheduler to a resumed run's new ``train.epochs``; returns the notice stating the new plan
    (None when nothing changed). Cosine: its length becomes ``steps_total``; the lr then falls monotonically
    from its current value to the minimum at the new end (never climbs back). Step and none: their lr does not
    depend on the run's length, so only the number of epochs changes."""
    cosine = isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    if cosine and scheduler.T_max != max(1, steps_total):
        scheduler.T_max = max(1, steps_total)
        lr = float(scheduler.optimizer.param_groups[0]["lr"])
        why = f"train.epochs {saved_epochs} -> {epochs}" if saved_epochs != epochs else "another number of steps"
        return (f"resuming {where} with {why}: the cosine schedule is re-planned to end at epoch {epochs} (step "
                f"{scheduler.T_max}); its lr falls from {lr:.4g} now to {scheduler.eta_min:g} at the new end, never "
                "climbing back")
    if saved_epochs != epochs:
        kind = "step" if isinstance(scheduler, torch.optim.lr_scheduler.StepLR) else "no"
        return (f"resuming {where} with train.epochs {saved_epochs} -> {epochs}: the run now ends at epoch {epochs} "
                f"({kind} lr schedule: its lr does not depend on the run's length)")
    return None
