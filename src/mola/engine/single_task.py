"""Single-task as the paper runs it: one independent run per task (its own loader over that task's data, its own
optimizer and schedule, the same epochs), each selected on its own validation metric, then one ``final.json``.

``mola train --arch single_task`` lands here. Sub-run ``k`` lives in ``RUN_DIR/tasks/<task>/`` and is an ordinary
run of arch ``single_task_joint`` restricted to that task (``data.tasks`` or, for domains, ``data.domains``), so
``mola train --config RUN_DIR/tasks/<task>/config.yaml`` reproduces it alone. The joint variant (T networks fed
the rows of one mixed batch, one optimizer, one selection) stays available as ``--arch single_task_joint``.
"""

from __future__ import annotations

import copy
import csv
import json
import sys
from pathlib import Path
from typing import Any

from mola.data import build_scenario
from mola.data.validate import missing_eval_rows
from mola.engine.checkpoint import has_checkpoint
from mola.engine.config import RunConfig
from mola.files import write_csv, write_text
from mola.metrics import mean_over_tasks

SEPARATE, JOINT = "single_task", "single_task_joint"


def task_dir(run_dir: str | Path, task: str) -> Path:
    """Folder of one task's sub-run inside a single-task run."""
    return Path(run_dir) / "tasks" / task


def run_has_checkpoint(run_dir: str | Path) -> bool:
    """A run (or any sub-run of a single-task run) has a checkpoint to resume from."""
    run_dir = Path(run_dir)
    subs = sorted((run_dir / "tasks").iterdir()) if (run_dir / "tasks").is_dir() else []
    return has_checkpoint(run_dir) or any(has_checkpoint(d) for d in subs if d.is_dir())


def task_config(cfg: RunConfig, task: str, heterogeneity: str, channels: int) -> RunConfig:
    """The sub-run config of ``task``: the same settings, restricted to one task, arch ``single_task_joint``.
    Input channels are pinned to the full scenario's so each network sees the inputs of the multi-task run."""
    sub = copy.deepcopy(cfg)
    sub.name = f"{cfg.name}-{task}"
    sub.model.arch = JOINT
    if heterogeneity == "domain":
        sub.data.domains, sub.data.tasks = [task], None
    else:
        sub.data.tasks = [task]
    sub.data.channels = channels
    sub.train.single_task_results = None
    return sub


def _sum_counts(parts: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0) + int(v)
    return out


def combine_finals(cfg: RunConfig, finals: dict[str, dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    """One ``final.json`` from the per-task ones: each task's scores from its own best-on-val checkpoint."""
    def pick(src: str, split: str) -> dict[str, Any]:
        out = {}
        for task, f in finals.items():
            res = (f["last"] if src == "last" else f)[split]
            if task in res:
                out[task] = res[task]
        return out

    from mola.engine.selection import selection_label

    val, test = pick("best", "val"), pick("best", "test")
    last_val, last_test = pick("last", "val"), pick("last", "test")
    seconds = [f.get("seconds_per_epoch") for f in finals.values()]
    return {
        "val": val, "test": test,
        "mean": {"val": mean_over_tasks(val), "test": mean_over_tasks(test) if test else {}},
        "best_epoch": {t: f["best_epoch"] for t, f in finals.items()},
        "selection": {"on": cfg.train.select_on, "valid_protocol": cfg.train.select_on == "val",
                      "note": selection_label(cfg)},
        "last": {"val": last_val, "test": last_test,
                 "mean": {"val": mean_over_tasks(last_val), "test": mean_over_tasks(last_test) if last_test else {}}},
        "epochs": max(f["epochs"] for f in finals.values()),
        "seconds_per_epoch": sum(s for s in seconds if s is not None) if any(s is not None for s in seconds) else None,
        "parameters": _sum_counts([f["parameters"] for f in finals.values()]),
        "scenario": summary,
        "arch": SEPARATE, "mode": None,
        "weighting": cfg.train.weighting, "method": cfg.train.method, "seed": cfg.train.seed,
        "single_task": {"protocol": "one run per task (own loader, optimizer, schedule and selection)",
                        "runs": {t: f"tasks/{t}" for t in finals}},
    }


def _write_metrics(run_dir: Path, tasks: list[str]) -> None:
    """The sub-runs' metrics.csv rows, one file, with a leading ``task`` column."""
    rows: list[dict[str, Any]] = []
    for t in tasks:
        path = task_dir(run_dir, t) / "metrics.csv"
        if path.is_file():
            with open(path, newline="") as fh:
                rows += [{"task": t, **r} for r in csv.DictReader(fh)]
    write_csv(rows, run_dir / "metrics.csv")


def _finished(sdir: Path, sub: RunConfig) -> dict[str, Any] | None:
    """The sub-run's final.json if it finished with this config and at least ``sub.train.epochs`` epochs (more
    epochs than it trained: None, it is continued), None if it has not finished; a finished sub-run of another
    config, or of more epochs than asked, is a ValueError listing the differences."""
    from mola.engine.config import load_config
    from mola.engine.run import RESUME_FREE_KEYS, config_diff

    done = sdir / "final.json"
    if not done.is_file():
        return None
    saved_cfg = load_config(sdir / "config.yaml", root_from_file=False)
    diffs = [d for d in config_diff(saved_cfg.to_dict(), sub.to_dict()) if d.split(":", 1)[0] not in RESUME_FREE_KEYS
             and not d.startswith(("name:", "out_dir:"))]
    if diffs:
        raise ValueError(f"sub-run {sdir} finished with another config ({'; '.join(diffs)}); "
                         "use a new --out folder")
    if sub.train.epochs < saved_cfg.train.epochs:
        raise ValueError(f"sub-run {sdir} finished {saved_cfg.train.epochs} epoch(s); resuming with "
                         f"train.epochs={sub.train.epochs} would throw trained epochs away. A resume keeps or raises "
                         "train.epochs; train a new run into another --out for fewer")
    if sub.train.epochs > saved_cfg.train.epochs:
        if not has_checkpoint(sdir):
            raise ValueError(f"sub-run {sdir} finished {saved_cfg.train.epochs} epoch(s) and has no checkpoint to "
                             f"continue to train.epochs={sub.train.epochs} from; train a new run into another --out")
        return None
    return dict(json.loads(done.read_text()))


def _check_resumable(sdir: Path, sub: RunConfig) -> None:
    """Every check a resume of sub-run ``sdir`` makes, done before anything is written: the checkpoint's data and
    model config equal ``sub``'s, and ``sub.train.epochs`` can continue it (``check_resume_epochs``)."""
    from mola.engine.checkpoint import load_latest
    from mola.engine.run import absolute_root, config_diff
    from mola.engine.setup import check_resume_epochs

    ckpt = load_latest(sdir)
    saved, mine = ckpt["config"], sub.to_dict()
    saved_data = dict(saved.get("data") or {})
    if isinstance(saved_data.get("root"), str):
        saved_data["root"] = absolute_root(saved_data["root"])
    diffs = config_diff({"data": saved_data, "model": saved.get("model")}, {k: mine[k] for k in ("data", "model")})
    if diffs:
        raise ValueError(f"sub-run {sdir} was trained with another data/model config; it cannot be resumed with "
                         f"this one. Differences (checkpoint -> now): {'; '.join(diffs)}; use a new --out folder")
    check_resume_epochs(ckpt, sub.train.epochs, str(ckpt["path"]))


def fit_single_task(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train every task alone, in sequence, then write the combined ``final.json`` (and return it).

    A finished sub-run (its ``final.json`` with the same config) is reused; with more ``train.epochs`` than it
    trained it is continued. One with a checkpoint but no ``final.json`` is resumed with ``resume`` and is an
    error without it, as for any run. Every sub-run is checked before anything (config.yaml included) is written.
    """
    from mola.engine.config import dump_config
    from mola.engine.run import absolute_root
    from mola.engine.trainer import Trainer

    run_dir = Path(run_dir)
    cfg.data.root = absolute_root(cfg.data.root)  # stored absolute, as the Trainer does (and its sub-runs)
    scenario = build_scenario(cfg.data)
    names = [t.name for t in scenario.tasks]
    missing_eval_rows(scenario, cfg.train.eval_test, cfg.train.allow_missing_eval)  # before any sub-run trains
    plan: list[tuple[str, RunConfig, Path, dict[str, Any] | None]] = []
    for task in names:  # every check first: a refused resume leaves the run folder as it was
        sub = task_config(cfg, task, scenario.heterogeneity, scenario.input_shape[0])
        sdir = task_dir(run_dir, task)
        done = _finished(sdir, sub)
        if done is None and has_checkpoint(sdir):
            if not resume:
                raise ValueError(f"sub-run {sdir} already holds a run; pass --resume to continue it")
            _check_resumable(sdir, sub)
        plan.append((task, sub, sdir, done))
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    finals: dict[str, dict[str, Any]] = {}
    for k, (task, sub, sdir, done) in enumerate(plan):
        if done is not None:
            print(f"single_task: task {k + 1}/{len(names)} {task!r} already finished in {sdir}", file=sys.stderr)
            finals[task] = done
            continue
        print(f"single_task: task {k + 1}/{len(names)} {task!r} alone -> {sdir}", file=sys.stderr)
        trainer = Trainer(sub, sdir)
        if resume and has_checkpoint(sdir):
            trainer.resume()
        finals[task] = trainer.fit()
    final = combine_finals(cfg, finals, scenario.summary())
    _write_metrics(run_dir, names)
    write_text(json.dumps(final, indent=2, default=float), run_dir / "final.json")  # as the Trainer writes it
    return final


__all__ = ["JOINT", "SEPARATE", "combine_finals", "fit_single_task", "run_has_checkpoint", "task_config",
           "task_dir"]
