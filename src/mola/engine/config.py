"""Run configuration: typed dataclasses loaded from YAML and overridden by dotted ``key=value`` pairs."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mola.config_utils import AliasBombError, from_dict, safe_load_unique
from mola.data.config import DataConfig
from mola.models.base import ModelConfig


@dataclass
class OptimConfig:
    """Optimizer and schedule; "auto" picks the paper's per-scenario default (docs/paper.md)."""

    name: Literal["auto", "sgd", "adam", "adamw"] = "auto"  # auto: domain AdamW, multi-input SGD, single-input Adam
    lr: float | None = None  # null: the scenario default (domain 1e-4, multi-input 0.05, single-input 1e-4)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float | None = None  # null: the default of the scenario (auto) or of the optimizer
    scheduler: Literal["auto", "cosine", "step", "none"] = "auto"  # auto: cosine for multi-input SGD, else none
    step_epochs: int = 100  # scheduler step: multiply the lr by step_gamma every step_epochs epochs (StepLR)
    step_gamma: float = 0.5  # scheduler step: the factor
    grad_clip: float | None = None  # clip the model's gradient norm to this value (null: no clipping)


@dataclass
class TrainConfig:
    """The loop: epochs, seed, loss weighting / gradient method, domain method, device and logging."""

    epochs: int = 10  # training epochs
    seed: int = 0  # seed of initialisation, sampling order and methods (data splits use data.split_seed)
    weighting: str = "ew"  # loss-weighting or gradient method (`mola list`)
    weighting_options: dict[str, Any] = field(default_factory=dict)  # keyword options of the weighting
    method: str = "erm"  # domain method (erm: plain sum of the losses); needs weighting ew
    method_options: dict[str, Any] = field(default_factory=dict)  # keyword options of the domain method
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...
    amp: bool = False  # bfloat16 autocast for forward and loss (CUDA only)
    max_steps_per_epoch: int | None = None  # cap on training steps per epoch (null: one pass over train)
    eval_test: bool = True  # also evaluate the test split (final.json)
    select_metric: str = "auto"  # val metric for the best checkpoint; auto: mean acc, or -val loss if not all classify
    #: model selection: val (select_metric on the val split), or test_loss: the lowest mean TEST loss, as the
    #: paper's released code did - NOT a valid protocol (the test split picks the model); outputs say so
    select_on: Literal["val", "test_loss"] = "val"
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss stops the run, or skips that step
    max_consecutive_skips: int = 3  # on_nonfinite=skip: this many skipped steps in a row stop the run
    on_nonfinite_metric: Literal["stop", "drop"] = "stop"  # NaN/inf val metric: stop, or drop task from selection
    checkpoint_every_steps: int | None = None  # also write the `last` checkpoint every N steps (null: per epoch)
    progress: bool = True  # show a progress bar (epoch i/N, step, running loss); the per-epoch line prints anyway
    log_every_steps: int = 10  # steps between reads of the running losses/method outputs (progress bar, TensorBoard)
    #: stop when the selection score has not improved for this many epochs (null: train every epoch)
    early_stopping: int | None = None
    tensorboard: bool = True  # write TensorBoard events to RUN_DIR/tb
    log_conflict_every: int | None = None  # epochs between task-conflict measurements (metrics.csv, TensorBoard)
    conflict_batches: int = 4  # K batches of each conflict measurement during training (docs/conflict.md)
    single_task_results: str | None = None  # final.json of a single-task run: adds delta_m / delta_p to final.json
    #: a task/domain with no val (or, while others have some, no test) rows is an error before training; true:
    #: train anyway, leaving it out of selection and the means, and final.json / mola report mark it
    allow_missing_eval: bool = False


@dataclass
class RunConfig:
    """Everything one ``mola train`` needs; ``config.yaml`` in the run directory is this, resolved."""

    name: str = "run"  # run name; the run directory is out_dir/name unless `mola train --out` says otherwise
    out_dir: str = "runs"  # parent folder of run directories
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
        value = safe_load_unique(raw) if raw != "" else None
    except AliasBombError as err:
        raise ValueError(f"override {item!r}: {err}") from err
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


SHIPPED_CONFIGS = Path(__file__).resolve().parents[3] / "configs"
"""The configs/ folder of the checkout mola is installed from (editable installs); ``--config NAME`` looks here."""


def config_folders() -> list[Path]:
    """Where ``--config NAME`` looks: ./configs, then the checkout's configs/ (and their paper/ folders)."""
    out: list[Path] = []
    for base in (Path("configs"), SHIPPED_CONFIGS):
        for d in (base, base / "paper"):
            if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
                out.append(d)
    return out


def find_config(path: str | Path) -> Path:
    """``path`` if it is a file, else a config found by name (``demo``, ``demo.yaml``, ``paper/vlcs_grad``) in
    ``config_folders()``; a FileNotFoundError lists close names, a ValueError says ``path`` is a folder or
    not a regular file."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.is_absolute():
        stem = p if p.suffix in (".yaml", ".yml") else p.with_name(p.name + ".yaml")
        for folder in config_folders():
            if (folder / stem).is_file():
                return folder / stem
        if stem.parts[:1] == ("configs",) and (SHIPPED_CONFIGS.parent / stem).is_file():
            return SHIPPED_CONFIGS.parent / stem  # configs/x.yaml of the checkout, from another folder
    if p.is_dir():
        inside = sorted(f.name for f in p.glob("*.y*ml"))[:5]
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise ValueError(f"config file {p} is a folder, not a YAML file{hint}; give the path of a .yaml file")
    if p.exists():
        raise ValueError(f"config file {p} is not a regular file; give the path of a .yaml file")
    near = sorted(f.name for f in p.parent.glob("*.y*ml")) if p.parent.is_dir() else []
    named = sorted({f.stem for d in config_folders() for f in d.glob("*.yaml")})
    close = [str(p.parent / c) for c in difflib.get_close_matches(p.name, near, n=3)]
    close += difflib.get_close_matches(p.stem, named, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise FileNotFoundError(f"config file not found: {p}.{hint} (`mola list` shows the shipped config names)")


def _root_from_file(data: dict[str, Any], config: Path) -> None:
    """A relative ``data.root`` in a config file is relative to the file's folder (so shipped configs work from
    any folder); a root that exists only relative to the working folder (older configs) is kept as it is."""
    section = data.get("data")
    if not isinstance(section, dict):
        return
    root = section.get("root")
    if not isinstance(root, str) or not root or Path(root).expanduser().is_absolute():
        return
    beside = config.parent / root
    if beside.exists() or not Path(root).exists():
        section["root"] = str(beside.resolve()) if beside.exists() else str(beside)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                arch: str | None = None, weighting: str | None = None, method: str | None = None,
                root_from_file: bool = True) -> RunConfig:
    """Read a YAML run config (a path, or a shipped config's name), apply CLI shorthands and dotted overrides,
    and validate every key. A relative ``data.root`` in the file is relative to the file's folder
    (``root_from_file=False``: kept as written, e.g. a run folder's stored config)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = find_config(path)
        try:
            loaded = safe_load_unique(p.read_text())
        except AliasBombError as err:
            raise ValueError(f"config file {p}: {err}") from err
        except yaml.YAMLError as err:
            raise ValueError(f"config file {p} is not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"config file {p} must hold a mapping at top level")
        data = loaded or {}
        if root_from_file:
            _root_from_file(data, p)
    if method in SHORTHANDS and arch not in (None, "mola"):
        raise ValueError(f"--method {method} implies --arch mola, not {arch}")
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
    cfg = from_dict(RunConfig, data)
    check_values(cfg)
    return cfg


# dotted key -> (lowest allowed value, inclusive?, null allowed?): numbers a run config may hold
_RANGES: dict[str, tuple[float, bool, bool]] = {
    "data.image_size": (1, True, True), "data.channels": (1, True, True),
    "data.val_fraction": (0, True, False), "data.test_fraction": (0, True, False),
    "data.max_per_task": (1, True, True), "data.max_eval_per_task": (1, True, True),
    "data.batch_size": (1, True, False), "data.eval_batch_size": (1, True, False),
    "data.num_workers": (0, True, False), "data.shift": (0, True, False),
    "model.backbone.width": (1, True, False), "model.head_hidden": (1, True, False),
    "train.epochs": (1, True, False), "train.max_steps_per_epoch": (1, True, True),
    "train.checkpoint_every_steps": (1, True, True), "train.max_consecutive_skips": (1, True, False),
    "train.early_stopping": (1, True, True),
    "train.log_conflict_every": (1, True, True), "train.conflict_batches": (1, True, False),
    "optim.lr": (0, False, True), "optim.momentum": (0, True, False), "optim.weight_decay": (0, True, True),
    "optim.grad_clip": (0, False, True),
}


def check_values(cfg: RunConfig) -> None:
    """Range checks of a run config's numbers, done when it is read (before any data or model is built): a
    ValueError naming the key, the value and the allowed range. NaN/inf are refused when a number is parsed.
    It reads the fields it checks one by one: free-form options (``model.options``, ...) are never copied."""
    for key, (low, inclusive, nullable) in _RANGES.items():
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, part, None)
        if node is None and nullable:
            continue
        ok = isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node) and (
            node >= low if inclusive else node > low)
        if not ok:
            rng = f"{'>=' if inclusive else '>'} {low:g}" + (" (or null)" if nullable else "")
            raise ValueError(f"config key {key} must be {rng}, got {node!r}")
    if cfg.data.shift > 1:
        raise ValueError(f"config key data.shift must be in [0, 1] (the share of pixels scrambled), got "
                         f"{cfg.data.shift!r}")
    for key in ("data.val_fraction", "data.test_fraction", "optim.momentum"):
        value = getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
        if value >= 1:
            raise ValueError(f"config key {key} must be < 1, got {value!r}")
    if cfg.data.val_fraction + cfg.data.test_fraction >= 1:
        raise ValueError(f"data.val_fraction + data.test_fraction must be < 1 (nothing left to train on), got "
                         f"{cfg.data.val_fraction} + {cfg.data.test_fraction}")


def dump_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
