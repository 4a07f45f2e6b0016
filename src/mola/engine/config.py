"""Run configuration: typed dataclasses loaded from YAML and overridden by dotted ``key=value`` pairs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mola.config_utils import from_dict
from mola.data.config import DataConfig
from mola.models.base import ModelConfig


@dataclass
class OptimConfig:
    """Optimizer and schedule; "auto" picks the paper's per-scenario default (method.md §11)."""

    name: Literal["auto", "sgd", "adam", "adamw"] = "auto"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    scheduler: Literal["auto", "cosine", "none"] = "auto"
    grad_clip: float | None = None


@dataclass
class TrainConfig:
    """The loop: epochs, seed, loss weighting / gradient method, domain method, device and logging."""

    epochs: int = 10
    seed: int = 0
    weighting: str = "ew"
    weighting_options: dict[str, Any] = field(default_factory=dict)
    method: str = "erm"
    method_options: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    amp: bool = False
    max_steps_per_epoch: int | None = None
    eval_test: bool = True
    select_metric: str = "auto"
    on_nonfinite: Literal["stop", "skip"] = "stop"
    progress: bool = True
    tensorboard: bool = True
    single_task_results: str | None = None


@dataclass
class RunConfig:
    """Everything one ``mola train`` needs; ``config.yaml`` in the run directory is this, resolved."""

    name: str = "run"
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b.c=value`` -> ("a.b.c", YAML-parsed value)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (creating levels); validation happens when the dataclass is built."""
    for item in overrides:
        key, value = parse_override(item)
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {} if node.get(p) is None else node[p]
                if not isinstance(node[p], dict):
                    raise ValueError(f"override {item!r}: {p!r} is not a section")
            node = node[p]
        node[parts[-1]] = value
    return data


SHORTHANDS = {
    "mola_grad": {"model": {"arch": "mola", "mola": {"mode": "grad"}}},
    "mola_router": {"model": {"arch": "mola", "mola": {"mode": "router"}}},
}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                arch: str | None = None, weighting: str | None = None, method: str | None = None) -> RunConfig:
    """Read a YAML run config, apply CLI shorthands and dotted overrides, and validate every key."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"config file {p} is not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"config file {p} must hold a mapping at top level")
        data = loaded or {}
    if method is not None:
        if method in SHORTHANDS:
            _merge(data, SHORTHANDS[method])
        else:
            _merge(data, {"train": {"method": method}})
    if arch is not None:
        _merge(data, {"model": {"arch": arch}})
    if weighting is not None:
        _merge(data, {"train": {"weighting": weighting}})
    apply_overrides(data, overrides or [])
    return from_dict(RunConfig, data)


def dump_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
