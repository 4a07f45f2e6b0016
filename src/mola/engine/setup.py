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


def resolve_device(name: str) -> torch.device:
    """``train.device``: "auto" is cuda when available, else cpu."""
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
