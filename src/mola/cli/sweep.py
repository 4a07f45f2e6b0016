"""``mola sweep``: run a grid of training runs through the engine, resumably, and summarise them.

sweep.yaml::

    base: configs/medmnist_grad.yaml     # a run config (relative: to the current folder, else the sweep file's)
    out_dir: runs/sweep1                 # one run directory per combination under here
    grid:                                # any of these axes; each a list (or one value)
      arch: [mola, hps]
      method: [mola_grad, mola_router, erm]
      weighting: [ew, pcgrad]
      seed: [0, 1, 2]
    overrides:                           # each name is one more axis; each item is one value on it:
      rank: [model.mola.rank=1, model.mola.rank=4]       #   a dotted=value string,
      lr: [[optim.lr=0.1, optim.name=sgd], {small: optim.lr=0.01}]   # a list applied together, or {label: ...}

Combinations that cannot run are marked ``invalid`` (a mola_* method with another arch; a domain method with a
weighting other than ew). A run whose ``final.json`` exists is skipped; one with a ``last`` checkpoint but no
``final.json`` is resumed. Each run directory gets a ``sweep.json`` (the combination, read by ``mola report``),
and ``out_dir/sweep_summary.csv`` gets one line per combination. Dotted overrides on the command line
(``mola sweep --config S train.epochs=1``) apply to every run (an override axis of the same key wins); those
of the sweep file's own keys change it (``grid.seed=[0]``, ``out_dir=runs/small``).

Ctrl-C stops the sweep: queued runs are not started, runs in flight get one SIGINT and end with their own clean
exit (their last checkpoint stays; the same command resumes them), the summary of what finished is written, and
the command exits 130.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mola.config_utils import safe_load_unique
from mola.engine.single_task import run_has_checkpoint
from mola.files import write_csv, write_text

GRID_AXES = ("arch", "method", "weighting", "seed")
SWEEP_KEYS = ("base", "out_dir", "grid", "overrides")


@dataclass
class SweepSpec:
    """A parsed sweep file: base config, output folder, grid axes and named override axes."""

    base: Path
    out_dir: Path
    grid: dict[str, list[Any]]
    overrides: dict[str, list[tuple[str, list[str]]]]
    common: list[str] = field(default_factory=list)  # dotted overrides of the command line, for every run


@dataclass
class PlannedRun:
    """One combination: its name, directory, engine arguments and status (new/resume/complete/invalid)."""

    name: str
    run_dir: Path
    arch: str | None = None
    method: str | None = None
    weighting: str | None = None
    seed: int | None = None
    overrides: list[str] = field(default_factory=list)
    override_axes: dict[str, str] = field(default_factory=dict)
    status: str = "new"
    reason: str = ""

    @property
    def override_label(self) -> str:
        return ",".join(self.override_axes.values())

    def meta(self) -> dict[str, Any]:
        return {"name": self.name, "arch": self.arch, "method": self.method, "weighting": self.weighting,
                "seed": self.seed, "overrides": self.overrides, "override_axes": self.override_axes,
                "override_label": self.override_label}


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_") or "x"


def _value_label(item: str) -> str:
    key, _, value = item.partition("=")
    return f"{key.strip().split('.')[-1]}={value.strip()}"


def _parse_override_item(axis: str, item: Any) -> tuple[str, list[str]]:
    """One value of an override axis: 'k=v', ['k=v', ...] or {label: 'k=v' | ['k=v', ...]} -> (label, list)."""
    label = None
    if isinstance(item, dict):
        if len(item) != 1:
            raise ValueError(f"sweep overrides.{axis}: a labelled item must have exactly one key, got {item!r}")
        label, item = next(iter(item.items()))
        label = str(label)
    items = [item] if isinstance(item, str) else item
    if not isinstance(items, list) or not all(isinstance(i, str) and "=" in i for i in items):
        raise ValueError(f"sweep overrides.{axis}: expected dotted.key=value strings (or lists of them), "
                         f"got {item!r}")
    return label or "+".join(_value_label(i) for i in items), list(items)


def _resolve(path: str, sweep_dir: Path | None) -> Path:
    from mola.engine.config import find_config

    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    alt = sweep_dir / p if sweep_dir is not None else p
    if alt.exists():
        return alt
    try:  # a shipped config by name or as configs/x.yaml, from any folder
        return find_config(p)
    except FileNotFoundError:
        return p


def _parse_grid(grid_in: Any) -> dict[str, list[Any]]:
    """The sweep's ``grid``: each axis of GRID_AXES a non-empty list (seeds integers, other values strings)."""
    if not isinstance(grid_in, dict):
        raise ValueError(f"sweep 'grid' must be a mapping of axes {list(GRID_AXES)}")
    bad = sorted(set(grid_in) - set(GRID_AXES))
    if bad:
        raise ValueError(f"unknown sweep grid axis {bad}; accepted: {list(GRID_AXES)} (use 'overrides' for others)")
    grid: dict[str, list[Any]] = {}
    for axis in (a for a in GRID_AXES if a in grid_in):
        vals = grid_in[axis] if isinstance(grid_in[axis], list) else [grid_in[axis]]
        if not vals:
            raise ValueError(f"sweep grid axis {axis!r} is empty")
        if axis == "seed" and not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            raise ValueError(f"sweep grid.seed must hold integers, got {vals}")
        grid[axis] = [v if axis == "seed" else str(v) for v in vals]
    return grid


def _parse_overrides(ov_in: Any) -> dict[str, list[tuple[str, list[str]]]]:
    """The sweep's ``overrides``: axis name -> labelled lists of dotted.key=value items (labels unique)."""
    if not isinstance(ov_in, dict):
        raise ValueError("sweep 'overrides' must map an axis name to a list of dotted.key=value items")
    overrides: dict[str, list[tuple[str, list[str]]]] = {}
    for axis, items in ov_in.items():
        items = items if isinstance(items, list) else [items]
        if not items:
            raise ValueError(f"sweep overrides.{axis} is empty")
        parsed = [_parse_override_item(str(axis), it) for it in items]
        labels = [_safe(lbl) for lbl, _ in parsed]
        if len(set(labels)) != len(labels):
            raise ValueError(f"sweep overrides.{axis}: two values share the label {labels}; label them {{name: ...}}")
        overrides[str(axis)] = parsed
    return overrides


def parse_sweep(data: dict[str, Any], sweep_dir: Path | None = None) -> SweepSpec:
    """Validate a sweep mapping (errors name the offending key and the accepted ones)."""
    if not isinstance(data, dict):
        raise ValueError("a sweep file must hold a mapping with keys " + ", ".join(SWEEP_KEYS))
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise ValueError(f"unknown sweep key(s) {unknown}; accepted: {list(SWEEP_KEYS)}")
    if not data.get("base"):
        raise ValueError("sweep key 'base' (path to a run config) is required")
    base = _resolve(str(data["base"]), sweep_dir)
    if not base.is_file():
        raise FileNotFoundError(f"sweep base config not found: {base}")
    grid = _parse_grid(data.get("grid") or {})
    overrides = _parse_overrides(data.get("overrides") or {})
    out_dir = Path(str(data.get("out_dir") or Path("runs") / "sweep")).expanduser()
    return SweepSpec(base, out_dir, grid, overrides)


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """Command-line overrides -> (those of the sweep file: ``grid.seed=[0]``, ``out_dir=...``; those of every run:
    ``train.epochs=1``)."""
    from mola.engine.config import parse_override

    sweep, runs = [], []
    for item in overrides:
        key, _ = parse_override(item)
        (sweep if key.split(".")[0] in SWEEP_KEYS else runs).append(item)
    return sweep, runs


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """Read and validate a sweep YAML file; ``overrides`` (dotted, e.g. ``grid.seed=[0]``) change it first."""
    from mola.engine.config import apply_overrides

    p = Path(path).expanduser()
    if not p.is_file() and not p.is_absolute():  # a shipped sweep by name (medmnist_compare) or path
        from mola.engine.config import SHIPPED_CONFIGS

        stem = p if p.suffix in (".yaml", ".yml") else p.with_name(p.name + ".yaml")
        shipped = (Path("configs") / "sweeps" / stem, SHIPPED_CONFIGS / "sweeps" / stem, SHIPPED_CONFIGS.parent / stem)
        for cand in shipped:
            if cand.is_file():
                p = cand
                break
    if not p.is_file():
        raise FileNotFoundError(f"sweep file not found: {p}")
    try:
        data = safe_load_unique(p.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"sweep file {p} is not valid YAML: {err}") from err
    if overrides:
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"sweep file {p} must hold a mapping")
        data = apply_overrides(data or {}, overrides)
    return parse_sweep(data or {}, p.parent)


def _invalid_reason(spec: SweepSpec, run: PlannedRun) -> str:
    """Why ``mola train`` would refuse this combination (the engine's own typed config and name checks), or ""."""
    from mola.engine import load_config
    from mola.engine.setup import validate_names

    try:
        validate_names(load_config(spec.base, run.overrides, arch=run.arch, weighting=run.weighting,
                                   method=run.method))
    except ValueError as err:
        return str(err)
    return ""


def run_status(run_dir: Path) -> str:
    """'complete' (final.json), 'resume' (a last checkpoint only) or 'new'."""
    if (run_dir / "final.json").is_file():
        return "complete"
    if run_has_checkpoint(run_dir):
        return "resume"
    return "new"


def plan_sweep(spec: SweepSpec) -> list[PlannedRun]:
    """Every combination of the grid and override axes, named, with its status; no training happens here."""
    axes = [a for a in GRID_AXES if a in spec.grid]
    values = [spec.grid[a] for a in axes] + [spec.overrides[k] for k in spec.overrides]
    plan, names = [], set()
    for combo in itertools.product(*values):
        kw = dict(zip(axes, combo[: len(axes)], strict=True))
        ov = combo[len(axes):]
        parts = [str(kw[a]) for a in ("arch", "method", "weighting") if a in kw]
        parts += [lbl for lbl, _ in ov]
        if "seed" in kw:
            parts.append(f"s{kw['seed']}")
        name = "-".join(_safe(p) for p in parts) or "run"
        if name in names:
            raise ValueError(f"sweep combinations collide on run name {name!r}; label the override values")
        names.add(name)
        run = PlannedRun(name, spec.out_dir / name, kw.get("arch"), kw.get("method"), kw.get("weighting"),
                         kw.get("seed"), [*spec.common, *(o for _, items in ov for o in items)],
                         {axis: lbl for axis, (lbl, _) in zip(spec.overrides, ov, strict=True)})
        reason = _invalid_reason(spec, run)
        run.status, run.reason = ("invalid", reason) if reason else (run_status(run.run_dir), "")
        plan.append(run)
    return plan


def train_command(run: PlannedRun, spec: SweepSpec) -> list[str]:
    """The ``python -m mola.cli.main train ...`` command line of one run."""
    cmd = [sys.executable, "-m", "mola.cli.main", "train", "--config", str(spec.base), "--out", str(run.run_dir)]
    for opt, val in (("--arch", run.arch), ("--method", run.method), ("--weighting", run.weighting),
                     ("--seed", run.seed)):
        if val is not None:
            cmd += [opt, str(val)]
    if run.status == "resume":
        cmd.append("--resume")
    return cmd + run.overrides + ["train.progress=false", f"name='{run.name}'"]


def _train_in_process(run: PlannedRun, spec: SweepSpec) -> dict[str, Any]:
    from mola.engine import Trainer, fit_single_task, load_config

    cfg = load_config(spec.base, [*run.overrides, "train.progress=false"], arch=run.arch, weighting=run.weighting,
                      method=run.method)
    if run.seed is not None:
        cfg.train.seed = run.seed
    cfg.name = run.name
    if cfg.model.arch == "single_task":  # one separate run per task, as `mola train` does
        return fit_single_task(cfg, run.run_dir, resume=run.status == "resume")
    trainer = Trainer(cfg, run.run_dir)
    if run.status == "resume":
        trainer.resume()
    final = trainer.fit()
    from mola.task_inference import write_trained_centroids

    write_trained_centroids(trainer)
    return final


INTERRUPT_GRACE_S = 20.0
"""After Ctrl-C, runs in flight get this long to end cleanly on their SIGINT before they are terminated."""


class Flight:
    """The sweep's stop flag and its ``mola train`` subprocesses in flight (shared by the worker threads)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.lock = threading.Lock()

    def interrupt(self, grace: float = INTERRUPT_GRACE_S) -> None:
        """Stop queued runs; send each run in flight one SIGINT, then terminate those still alive after
        ``grace`` seconds."""
        self.stop.set()
        with self.lock:
            procs = list(self.procs.values())
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep, carrying the summary rows written when it stopped."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        super().__init__("sweep interrupted")
        self.rows = rows


def _train_subprocess(run: PlannedRun, spec: SweepSpec, threads: int | None, flight: Flight | None = None) -> None:
    env = dict(os.environ)
    if threads and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(run.run_dir / "train.log", "a") as log:
        # a session of its own: a terminal's Ctrl-C reaches only the sweep, which forwards one SIGINT
        proc = subprocess.Popen(train_command(run, spec), stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        if flight is not None:
            with flight.lock:
                flight.procs[run.name] = proc
        try:
            proc.wait()
        finally:
            if flight is not None:
                with flight.lock:
                    flight.procs.pop(run.name, None)
    if flight is not None and flight.stop.is_set() and proc.returncode != 0:
        raise KeyboardInterrupt
    if proc.returncode != 0:
        tail = (run.run_dir / "train.log").read_text().strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"exit {proc.returncode}: {tail[0]} (see {run.run_dir / 'train.log'})")


def _execute(run: PlannedRun, spec: SweepSpec, subprocess_mode: bool, threads: int | None,
             flight: Flight | None = None) -> dict[str, Any]:
    if flight is not None and flight.stop.is_set():
        return summary_row(run, "not started")
    run.run_dir.mkdir(parents=True, exist_ok=True)
    write_text(json.dumps(run.meta(), indent=2), run.run_dir / "sweep.json")
    start = time.perf_counter()
    resumed = run.status == "resume"
    try:
        if subprocess_mode:
            _train_subprocess(run, spec, threads, flight)
        else:
            _train_in_process(run, spec)
        status, error = ("resumed" if resumed else "trained"), ""
    except KeyboardInterrupt:
        if not subprocess_mode:
            raise
        status, error = "interrupted", "Ctrl-C; the same command resumes it"
    except Exception as err:  # noqa: BLE001 - one failed run must not stop the sweep; it is recorded
        status, error = "failed", f"{type(err).__name__}: {err}"
    return summary_row(run, status, time.perf_counter() - start, error)


def summary_row(run: PlannedRun, status: str, seconds: float | None = None, error: str = "") -> dict[str, Any]:
    """One sweep_summary.csv line: the combination, what happened, and the mean val/test metrics if finished."""
    row: dict[str, Any] = {"name": run.name, "status": status, "arch": run.arch, "method": run.method,
                           "weighting": run.weighting, "seed": run.seed, "override": run.override_label,
                           "run_dir": str(run.run_dir), "seconds": None if seconds is None else round(seconds, 2),
                           "error": error or run.reason}
    final = run.run_dir / "final.json"
    if final.is_file():
        try:
            data = json.loads(final.read_text())
            row["best_epoch"] = data.get("best_epoch")
            for split in ("val", "test"):
                for m, v in (data.get("mean", {}).get(split) or {}).items():
                    if m != "loss":
                        row[f"{split}_mean_{m}"] = v
        except (OSError, ValueError):
            row["error"] = row["error"] or "unreadable final.json"
    return row


def write_summary(rows: list[dict[str, Any]], path: Path) -> None:
    """Write the summary CSV atomically (columns in first-seen order)."""
    write_csv(rows, path)


def run_sweep(spec: SweepSpec, plan: list[PlannedRun], workers: int = 1, progress: bool = True) -> list[dict[str, Any]]:
    """Train the new/resume runs of ``plan`` (in-process, or ``workers`` subprocesses); return the summary rows."""
    from tqdm.auto import tqdm

    rows: dict[str, dict[str, Any]] = {}
    for run in plan:
        if run.status in ("complete", "invalid"):
            rows[run.name] = summary_row(run, "skipped" if run.status == "complete" else "invalid")
    todo = [r for r in plan if r.status in ("new", "resume")]
    summary = spec.out_dir / "sweep_summary.csv"

    def flush() -> None:
        write_summary([rows[r.name] for r in plan if r.name in rows], summary)

    flush()
    flight = Flight()
    with tqdm(total=len(todo), desc="sweep", unit="run", disable=not progress) as bar:
        if workers <= 1:
            for run in todo:
                bar.set_postfix_str(run.name)
                try:
                    rows[run.name] = _execute(run, spec, False, None)
                except KeyboardInterrupt:
                    rows[run.name] = summary_row(run, "interrupted", error="Ctrl-C; the same command resumes it")
                    for rest in todo:
                        rows.setdefault(rest.name, summary_row(rest, "not started"))
                    flush()
                    raise SweepInterrupted([rows[r.name] for r in plan]) from None
                flush()
                bar.update(1)
        else:
            threads = max(1, (os.cpu_count() or 1) // workers)
            pool = ThreadPoolExecutor(max_workers=workers)
            futures = {pool.submit(_execute, run, spec, True, threads, flight): run for run in todo}
            try:
                for fut in as_completed(futures):
                    run = futures[fut]
                    rows[run.name] = fut.result()
                    flush()
                    bar.set_postfix_str(run.name)
                    bar.update(1)
            except KeyboardInterrupt:
                pool.shutdown(wait=False, cancel_futures=True)
                flight.interrupt()
                pool.shutdown(wait=True)
                for fut, run in futures.items():
                    done = fut.done() and not fut.cancelled() and fut.exception() is None
                    rows[run.name] = fut.result() if done else summary_row(run, "not started")
                flush()
                raise SweepInterrupted([rows[r.name] for r in plan]) from None
            pool.shutdown(wait=True)
    return [rows[r.name] for r in plan]


STATUSES = ("trained", "resumed", "skipped", "failed", "invalid", "interrupted", "not started")


def _print_counts(rows: list[dict[str, Any]], summary: Path) -> None:
    print(f"wrote {summary}: " + ", ".join(f"{n} {s}" for s in STATUSES
                                           if (n := sum(r["status"] == s for r in rows)) or s in STATUSES[:5]))


def cmd_sweep(args: argparse.Namespace) -> int:
    sweep_overrides, run_overrides = split_overrides(list(args.overrides or []))
    spec = load_sweep(args.config, sweep_overrides)
    spec.common = run_overrides
    plan = plan_sweep(spec)
    counts = {s: sum(r.status == s for r in plan) for s in ("new", "resume", "complete", "invalid")}
    print(f"sweep {args.config}: {len(plan)} combinations -> {spec.out_dir} (" +
          ", ".join(f"{v} {k}" for k, v in counts.items()) + ")", file=sys.stderr)
    for r in plan:
        if r.status == "invalid":
            print(f"  invalid: {r.name}: {r.reason}", file=sys.stderr)
    if args.dry_run:
        for r in plan:
            print(f"{r.status:9s} {r.name}")
        return 0
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    try:
        rows = run_sweep(spec, plan, args.workers, progress=not args.no_progress)
    except SweepInterrupted as stop:
        _print_counts(stop.rows, spec.out_dir / "sweep_summary.csv")
        raise KeyboardInterrupt from None  # `mola` prints how to continue and exits 130
    failed = [r for r in rows if r["status"] == "failed"]
    _print_counts(rows, spec.out_dir / "sweep_summary.csv")
    for r in failed:
        print(f"  failed: {r['name']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def add_parser(subparsers: Any) -> None:
    """Register ``mola sweep``."""
    p = subparsers.add_parser("sweep", help="train a grid of runs (arch x method x weighting x seed x overrides)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", required=True, help="sweep YAML file (base, out_dir, grid, overrides)")
    p.add_argument("--workers", "-j", type=int, default=1,
                   help="1: train in this process one run after another; N>1: N `mola train` subprocesses")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and their status, train nothing")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("overrides", nargs="*",
                   help="dotted.key=value overrides: of every run (train.epochs=1) or of the sweep file "
                        "(grid.seed=[0], out_dir=runs/small)")
    p.set_defaults(func=cmd_sweep)


__all__ = ["PlannedRun", "SweepSpec", "add_parser", "load_sweep", "parse_sweep", "plan_sweep", "run_status",
           "run_sweep", "train_command", "write_summary"]
