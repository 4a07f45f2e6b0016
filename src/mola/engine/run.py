"""``load_run``: the one way to read a trained run (``mola eval``, ``analyze``, ``predict``, ``export`` and the
Trainer's final evaluation). It checks the stored config, rebuilds the scenario and the model and loads the
weights; it never builds data loaders or an optimizer."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mola.config_utils import from_dict
from mola.data import build_scenario
from mola.engine.checkpoint import CHECKPOINT_NAMES, checkpoint_path, load_checkpoint
from mola.engine.config import RunConfig, apply_overrides, parse_override
from mola.models import build_model
from mola.models.base import MultiTaskModel
from mola.tasks import Scenario

LOAD_OVERRIDES = ("data.root", "data.eval_batch_size", "data.num_workers")
"""Config keys a loaded run may change (where the data lives and how it is read), never the model."""


@dataclass
class LoadedRun:
    """A trained run read back: its config, scenario and model (eval mode) at one checkpoint."""

    run_dir: Path
    path: Path  # the checkpoint file read
    cfg: RunConfig
    scenario: Scenario
    model: MultiTaskModel
    state: dict[str, Any]  # the checkpoint's other content: epoch, best_epoch, method state, history, ...

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.scenario.tasks]


RESUME_FREE_KEYS = ("train.epochs", "train.progress", "train.tensorboard", "train.device", "train.eval_test",
                    "train.checkpoint_every_steps", "train.on_nonfinite", "train.single_task_results",
                    "train.max_consecutive_skips", "train.on_nonfinite_metric", "train.log_every_steps",
                    "train.log_conflict_every", "train.conflict_batches")
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


def check_compatible(saved: dict[str, Any], now: dict[str, Any], where: str) -> list[str]:
    """The one config-compatibility check of loading a checkpoint into a configured run (``saved``, ``now``: the
    checkpoint's and this run's ``RunConfig.to_dict()``). A different data or model config is a ValueError
    listing the differences; returns the changed train/optim settings that change the result (all but
    ``RESUME_FREE_KEYS``), for the caller to warn about."""
    saved_data = dict(saved.get("data") or {})
    if isinstance(saved_data.get("root"), str):  # runs written before roots were stored absolute
        saved_data["root"] = absolute_root(saved_data["root"])
    diffs = config_diff({"data": saved_data, "model": saved.get("model")}, {k: now[k] for k in ("data", "model")})
    if diffs:
        sections = sorted({d.split(".", 1)[0] for d in diffs})
        raise ValueError(f"checkpoint {where} was written with another {' and '.join(sections)} config; it "
                         f"cannot be loaded here. Differences (checkpoint -> now): {'; '.join(diffs)}")
    run_keys = ("train", "optim")
    return [d for d in config_diff({k: saved.get(k) for k in run_keys}, {k: now[k] for k in run_keys})
            if d.split(":", 1)[0] not in RESUME_FREE_KEYS]


def absolute_root(root: str) -> str:
    """``data.root`` as an absolute path (a run then reads its data from any working directory)."""
    return str(Path(root).expanduser().resolve())


def run_dir_of(run_or_file: str | os.PathLike[str]) -> Path:
    """The run directory of a run directory or of a checkpoint file inside one (the folder with config.yaml)."""
    path = Path(run_or_file)
    if path.is_dir():
        return path
    for parent in path.parents:
        if (parent / "config.yaml").is_file():
            return parent
    return path.parent.parent


def find_checkpoint(run_or_file: str | os.PathLike[str], which: str = "best") -> Path:
    """The checkpoint file of a run directory or the file given; FileNotFoundError naming the path as given."""
    if which not in CHECKPOINT_NAMES:
        raise ValueError(f"checkpoint must be one of {', '.join(CHECKPOINT_NAMES)}, got {which!r}")
    given = Path(run_or_file)
    if given.is_file():
        return given
    if not given.exists():
        near = sorted(p.name for p in given.parent.iterdir())[:8] if given.parent.is_dir() else []
        hint = f"; {given.parent} holds: {', '.join(near)}" if near else ""
        raise FileNotFoundError(f"{given} does not exist (expected a run directory or a checkpoint file){hint}")
    path = checkpoint_path(given, which)
    if not path.is_file():
        tasks = sorted(p.name for p in (given / "tasks").glob("*") if checkpoint_path(p, which).is_file())
        if tasks:  # arch single_task: one run per task (engine/single_task.py), no model of all tasks
            raise FileNotFoundError(
                f"{given} is a single_task run: each task's network is its own run under {given / 'tasks'} "
                f"({', '.join(tasks)}); give one of those, e.g. {given / 'tasks' / tasks[0]}")
        other = "last" if which == "best" else "best"
        if checkpoint_path(given, other).is_file():
            raise FileNotFoundError(f"{given} has no {which} checkpoint ({path.relative_to(given)}) but has a {other} "
                                    f"one; to use it pass --checkpoint {other} (mola analyze), --which {other} (mola "
                                    f"eval), or the file {checkpoint_path(given, other)}")
        raise FileNotFoundError(f"{given} is not a mola run directory: it has no {which} checkpoint "
                                f"({path.relative_to(given)})")
    return path


def load_tensors(module: nn.Module, state: dict[str, Tensor], where: str, what: str) -> None:
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


def stored_config(state: dict[str, Any], where: Path, overrides: Sequence[str] = ()) -> RunConfig:
    """The typed RunConfig of a checkpoint with load-time ``overrides`` (only ``LOAD_OVERRIDES`` keys)."""
    for item in overrides:
        key = parse_override(item)[0]
        if key not in LOAD_OVERRIDES:
            raise ValueError(f"override {item!r}: a trained run only accepts {', '.join(LOAD_OVERRIDES)} "
                             "(the model is fixed by its checkpoint)")
    data = apply_overrides(copy.deepcopy(state["config"]), list(overrides))
    try:
        return from_dict(RunConfig, data)
    except ValueError as err:
        raise ValueError(f"checkpoint {where} holds a config this mola cannot read: {err}") from err


def _scenario(cfg: RunConfig, where: Path, overrides: Sequence[str]) -> Scenario:
    """The run's scenario; a missing data folder names where its path came from and how to point elsewhere."""
    root = Path(cfg.data.root).expanduser()
    if not root.exists():
        source = ("data.root given on the command line" if any(o.startswith("data.root=") for o in overrides)
                  else f"data.root stored in the run's config ({where})")
        rel = "" if root.is_absolute() else f", relative to the working directory {Path.cwd()}"
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist ({source}{rel}); pass "
                                "data.root=PATH to read the data from where it is now")
    return build_scenario(cfg.data)


def load_run(run_or_file: str | os.PathLike[str], which: str = "best", device: str | torch.device = "cpu", *,
             overrides: Sequence[str] = (), scenario: Scenario | None = None,
             model: MultiTaskModel | None = None) -> LoadedRun:
    """Read checkpoint ``which`` ("best"/"last") of a run directory, or a checkpoint file.

    ``overrides``: ``data.root=...`` (and the other ``LOAD_OVERRIDES``) when the data moved. ``scenario`` and
    ``model`` reuse what the caller already built (the Trainer): the weights are loaded into ``model`` then."""
    path = find_checkpoint(run_or_file, which)
    state = load_checkpoint(path)
    cfg = stored_config(state, path, overrides)
    scenario = scenario if scenario is not None else _scenario(cfg, path, overrides)
    target = model if model is not None else build_model(scenario, cfg.model)
    load_tensors(target, state["model"], f"checkpoint {path}", "model")
    if model is None:
        target.to(device)
    target.eval()
    return LoadedRun(run_dir_of(path), path, cfg, scenario, target, state)


__all__ = ["LOAD_OVERRIDES", "RESUME_FREE_KEYS", "LoadedRun", "absolute_root", "check_compatible", "config_diff",
           "find_checkpoint", "load_run", "load_tensors", "run_dir_of", "stored_config"]
