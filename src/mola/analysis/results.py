"""Reading finished runs for reports: ``final.json`` scores, the typed ``config.yaml``, the scenario a run
belongs to, and the rule that runs pooled as seeds of one row differ only by seed."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mola.engine.config import load_config

GroupKey = tuple[str, str, str, str, str]
POOL_FREE_KEYS = frozenset({
    "name", "out_dir", "train.seed", "train.progress", "train.tensorboard", "train.device", "train.eval_test",
    "train.checkpoint_every_steps", "train.single_task_results", "data.num_workers", "data.eval_batch_size"})
"""Config keys that may differ between runs pooled as seeds of one row (they do not change the trained model)."""
SCENARIO_KEYS = ("kind", "root", "domains", "tasks", "image_size", "channels", "feature", "val_fraction",
                 "test_fraction", "split_seed", "max_per_task", "max_eval_per_task", "shift")
"""``data.*`` keys that define a scenario: runs that differ in any of them are reported in separate tables."""



@dataclass
class RunResult:
    """One run's identity and its per-task scores on the reported split."""

    path: Path
    arch: str
    mode: str
    weighting: str
    method: str
    override: str
    seed: int | None
    scores: dict[str, dict[str, float]]
    config: dict[str, Any] | None = None  # the resolved RunConfig as a dict (None: the run has no config.yaml)
    selected_on_test: bool = False  # its checkpoint was chosen on the test split (train.select_on=test_loss)
    params: int | None = None  # trainable parameters (final.json; older runs: every parameter of the model)
    missing_eval: dict[str, list[str]] = field(default_factory=dict)  # split -> tasks with no rows there
    override_keys: tuple[str, ...] = ()  # config keys its sweep variant sets (sweep.json): the row's own keys

    @property
    def key(self) -> GroupKey:
        return (self.arch, self.mode, self.weighting, self.method, self.override)



def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories (holding final.json) among ``paths``; a directory of runs (e.g. a sweep) is expanded."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "final.json").is_file():
            out.append(p)
        elif p.is_dir():
            kids = sorted(c for c in p.iterdir() if (c / "final.json").is_file())
            if not kids:
                raise FileNotFoundError(f"{p} holds no final.json (neither a finished run nor a folder of runs)")
            out += kids
        else:
            raise FileNotFoundError(f"run directory not found: {p}")
    if not out:
        raise ValueError("report needs at least one run directory")
    return out


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file, or a ValueError naming the file, what it should be and the fix."""
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} ({what}) is not valid JSON ({err}); restore it (retraining "
                         "the run writes it again) or leave this run out of the report") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} ({what}) must hold a JSON object, got {type(data).__name__}; leave this run out "
                         "or re-create the file")
    return data


def read_config(path: Path) -> dict[str, Any] | None:
    """A run's ``config.yaml`` read through the typed RunConfig (defaults filled in), or None if it has none."""
    cfg = path / "config.yaml"
    if not cfg.is_file():
        return None
    try:
        out = load_config(cfg, root_from_file=False).to_dict()  # a run's stored root: absolute, or (older) cwd-relative
    except (ValueError, TypeError) as err:
        raise ValueError(f"{cfg} is not a valid mola run config: {err}") from err
    if out["data"].get("root"):  # runs store it relative (older) or absolute: compare them as absolute paths
        out["data"]["root"] = os.path.normpath(os.path.abspath(out["data"]["root"]))
    return out


def read_run_result(path: str | Path, split: str = "test", checkpoint: str = "best") -> RunResult:
    """Read ``final.json``, ``config.yaml`` and (for the override label) ``sweep.json`` of one run."""
    path = Path(path)
    final = read_json(path / "final.json", "a run's results")
    if checkpoint not in ("best", "last"):
        raise ValueError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    src = final if checkpoint == "best" else final.get("last", {})
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    scores = src.get(split) or {}
    if not scores:
        raise ValueError(f"{path / 'final.json'} has no {checkpoint} {split} results (train.eval_test off?)")
    config = read_config(path)
    cfg = config or {}
    model, train = cfg.get("model", {}), cfg.get("train", {})
    arch = final.get("arch") or model.get("arch", "?")
    mode = final.get("mode") or (model.get("mola", {}).get("mode") if arch == "mola" else None) or ""
    sweep = path / "sweep.json"
    meta = read_json(sweep, "a sweep run's combination") if sweep.is_file() else {}
    override = meta.get("override_label", "")
    items = meta.get("overrides") if isinstance(meta.get("overrides"), list) else []
    override_keys = tuple(sorted({str(o).split("=", 1)[0].strip() for o in items}))
    seed = final.get("seed", train.get("seed"))
    return RunResult(path, arch, mode, final.get("weighting") or train.get("weighting", "ew"),
                     final.get("method") or train.get("method", "erm"), override or "", seed,
                     {t: {m: float(v) for m, v in r.items() if isinstance(v, (int, float))} for t, r in scores.items()},
                     config, final.get("selection", {}).get("valid_protocol", True) is False, trainable_count(final),
                     {s: list(v) for s, v in (final.get("missing_eval") or {}).items()}, override_keys)


def trainable_count(final: dict[str, Any]) -> int | None:
    """Trainable parameters of a run's final.json: ``trainable_parameters`` (model and method), else the
    model's ``parameters.total`` (runs written before the count was stored), else None."""
    value = final.get("trainable_parameters")
    if value is None:
        value = (final.get("parameters") or {}).get("total") if isinstance(final.get("parameters"), dict) else None
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def scenario_key(run: RunResult) -> str:
    """A readable identity of the run's scenario (``data.*`` keys of SCENARIO_KEYS); "" without a config."""
    if run.config is None:
        return ""
    data = dict(run.config.get("data", {}))
    if data.get("root"):
        data["root"] = os.path.normpath(str(data["root"]))
    return ", ".join(f"{k}={data.get(k)}" for k in SCENARIO_KEYS if data.get(k) is not None)


def split_by_scenario(runs: list[RunResult]) -> list[list[RunResult]]:
    """Runs grouped by scenario (first-seen order): each group becomes its own table."""
    groups: dict[str, list[RunResult]] = {}
    for r in runs:
        groups.setdefault(scenario_key(r), []).append(r)
    return list(groups.values())


def check_pooled(runs: list[RunResult], label: str) -> None:
    """Runs pooled as seeds of one row must have the same config except POOL_FREE_KEYS; else a ValueError
    listing the keys that differ and two runs that show it."""
    known = [r for r in runs if r.config is not None]
    if len(known) < 2:
        return
    ref = _flat(known[0].config)
    for r in known[1:]:
        other = _flat(r.config)
        diffs = [f"{k}: {ref.get(k, '<absent>')!r} vs {other.get(k, '<absent>')!r}"
                 for k in sorted(set(ref) | set(other)) if k not in POOL_FREE_KEYS and ref.get(k) != other.get(k)]
        if diffs:
            raise ValueError(
                f"report row {label!r} would pool runs whose configs differ other than by seed ("
                f"{known[0].path} and {r.path}: {'; '.join(diffs[:8])}{'; ...' if len(diffs) > 8 else ''}); "
                "put them in separate folders, or give them distinct sweep override labels")


ROW_KEYS = ("model.arch", "model.options", "model.mola.mode", "train.weighting", "train.weighting_options",
            "train.method", "train.method_options")
"""Config keys (and sections) that make a report row what it is: paired rows may differ in them."""


def _covered(key: str, allowed: Iterable[str]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allowed)


def check_paired(base: list[RunResult], other: list[RunResult], label: str, allow: Sequence[str] = ()) -> None:
    """Rows paired by seed must have the same config except the seed, the row's own keys (``ROW_KEYS`` and the
    keys their sweep variants set, which the row labels show), ``POOL_FREE_KEYS`` and the keys (or sections) in
    ``allow``; else a ValueError naming the differing keys and ``--allow-diff``."""
    a = next((r for r in base if r.config is not None), None)
    b = next((r for r in other if r.config is not None), None)
    if a is None or b is None:
        return
    ref, mine = _flat(a.config), _flat(b.config)
    free = (*POOL_FREE_KEYS, *ROW_KEYS, *a.override_keys, *b.override_keys, *allow)
    diffs = [f"{k}: {ref.get(k, '<absent>')!r} vs {mine.get(k, '<absent>')!r}"
             for k in sorted(set(ref) | set(mine)) if not _covered(k, free) and ref.get(k) != mine.get(k)]
    if diffs:
        keys = sorted({d.split(":", 1)[0] for d in diffs})
        raise ValueError(
            f"--paired: row {label!r} differs from the reference by more than the seed and its method "
            f"({a.path} vs {b.path}: {'; '.join(diffs[:8])}{'; ...' if len(diffs) > 8 else ''}); a paired difference "
            f"would mix those changes in. If that is intended, pass {' '.join('--allow-diff ' + k for k in keys)}")


__all__ = ["POOL_FREE_KEYS", "ROW_KEYS", "SCENARIO_KEYS", "GroupKey", "RunResult", "check_paired", "check_pooled",
           "find_runs", "read_config", "read_json", "read_run_result", "scenario_key", "split_by_scenario"]
