"""Result tables over many runs: rows = (arch, mode, weighting, method, override) groups, mean +/- std over
seeds, columns = tasks + Avg (+ Delta_m / Delta_p against a single_task row). Reads ``final.json`` files only."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mola.metrics import HIGHER_IS_BETTER, delta_m

FRACTION_METRICS = frozenset({"acc", "auc", "miou", "pix_acc", "within_11.25", "within_22.5", "within_30"})
AUTO_METRICS = ("acc", "miou", "abs_err", "mean")
AVG, DELTA_M, DELTA_P = "Avg", "Delta_m", "Delta_p"
GroupKey = tuple[str, str, str, str, str]


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

    @property
    def key(self) -> GroupKey:
        return (self.arch, self.mode, self.weighting, self.method, self.override)


@dataclass
class ReportRow:
    """One "method" row: the runs of one group and each column's per-run values."""

    label: str
    key: GroupKey
    runs: list[RunResult]
    values: dict[str, list[float]] = field(default_factory=dict)

    def mean(self, col: str) -> float:
        v = [x for x in self.values.get(col, []) if math.isfinite(x)]
        return float(np.mean(v)) if v else math.nan

    def std(self, col: str) -> float:
        """Sample standard deviation over seeds (nan with fewer than two runs)."""
        v = [x for x in self.values.get(col, []) if math.isfinite(x)]
        return float(np.std(v, ddof=1)) if len(v) >= 2 else math.nan


@dataclass
class ReportTable:
    """Rows, columns, the metric each task column shows and which direction is better per column."""

    rows: list[ReportRow]
    columns: list[str]
    task_metrics: dict[str, str]
    higher_better: dict[str, bool]
    metric: str
    split: str
    checkpoint: str
    reference: str | None = None
    delta_metrics: str = "primary"

    def best(self, col: str) -> float:
        vals = [r.mean(col) for r in self.rows if math.isfinite(r.mean(col))]
        if not vals:
            return math.nan
        return max(vals) if self.higher_better[col] else min(vals)

    def column_metric(self, col: str) -> str | None:
        if col in self.task_metrics:
            return self.task_metrics[col]
        if col == AVG:
            metrics = set(self.task_metrics.values())
            return metrics.pop() if len(metrics) == 1 else None
        return None


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


def _config(path: Path) -> dict[str, Any]:
    cfg = path / "config.yaml"
    return (yaml.safe_load(cfg.read_text()) or {}) if cfg.is_file() else {}


def load_run(path: str | Path, split: str = "test", checkpoint: str = "best") -> RunResult:
    """Read ``final.json`` (and ``sweep.json`` for the override label) of one run."""
    path = Path(path)
    final = json.loads((path / "final.json").read_text())
    if checkpoint not in ("best", "last"):
        raise ValueError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    src = final if checkpoint == "best" else final.get("last", {})
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    scores = src.get(split) or {}
    if not scores:
        raise ValueError(f"{path / 'final.json'} has no {checkpoint} {split} results (train.eval_test off?)")
    cfg = _config(path) if any(k not in final for k in ("arch", "weighting", "method", "seed")) else {}
    model, train = cfg.get("model", {}), cfg.get("train", {})
    arch = final.get("arch") or model.get("arch", "?")
    mode = final.get("mode") or (model.get("mola", {}).get("mode") if arch == "mola" else None) or ""
    sweep = path / "sweep.json"
    override = json.loads(sweep.read_text()).get("override_label", "") if sweep.is_file() else ""
    seed = final.get("seed", train.get("seed"))
    return RunResult(path, arch, mode, final.get("weighting") or train.get("weighting", "ew"),
                     final.get("method") or train.get("method", "erm"), override or "", seed,
                     {t: {m: float(v) for m, v in r.items() if isinstance(v, (int, float))} for t, r in scores.items()})


def row_label(key: GroupKey) -> str:
    """Readable row name: ``mola-router``, ``hps+pcgrad``, ``hps+dann``, ``mola-grad [rank=8]``."""
    arch, mode, weighting, method, override = key
    label = f"{arch}-{mode}" if mode else arch
    if weighting and weighting != "ew":
        label += f"+{weighting}"
    if method and method != "erm":
        label += f"+{method}"
    return f"{label} [{override}]" if override else label


def _task_metric(task: str, runs: list[RunResult], metric: str) -> str | None:
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r.scores.get(task, {}) if k not in keys]
    if metric in keys:
        return metric
    return next((m for m in AUTO_METRICS if m in keys), None)


def _reference_scores(ref: ReportRow, tasks: list[str], task_metrics: dict[str, str],
                      delta_metrics: str) -> dict[str, dict[str, float]]:
    """Single-task means per task and metric: the column metric only, or every metric with a known direction."""
    out: dict[str, dict[str, float]] = {}
    for t in tasks:
        if delta_metrics == "primary":
            names = [task_metrics[t]]
        else:
            names = []
            for r in ref.runs:
                names += [m for m in r.scores.get(t, {}) if m in HIGHER_IS_BETTER and m not in names]
        means = {m: float(np.mean(v)) for m in names
                 if (v := [x for r in ref.runs if math.isfinite(x := r.scores.get(t, {}).get(m, math.nan))])}
        if means:
            out[t] = means
    return out


def build_table(runs: list[RunResult], metric: str = "acc", split: str = "test", checkpoint: str = "best",
                delta_metrics: str = "primary") -> ReportTable:
    """Group runs into rows and fill each column's per-run values (tasks, Avg, Delta_m/Delta_p).

    ``delta_metrics``: "primary" (Delta_m over each task's column metric, as final.json) or "all" (every metric of
    a task with a known direction, the paper's NYUv2 Delta_m).
    """
    if not runs:
        raise ValueError("build_table needs at least one run")
    if delta_metrics not in ("primary", "all"):
        raise ValueError(f"delta_metrics must be 'primary' or 'all', got {delta_metrics!r}")
    tasks: list[str] = []
    for r in runs:
        tasks += [t for t in r.scores if t not in tasks]
    task_metrics = {t: m for t in tasks if (m := _task_metric(t, runs, metric)) is not None}
    tasks = [t for t in tasks if t in task_metrics]
    groups: dict[GroupKey, list[RunResult]] = {}
    for r in runs:
        groups.setdefault(r.key, []).append(r)
    keys = sorted(groups, key=lambda k: k[0] != "single_task")  # stable: single_task first, then input order
    rows = [ReportRow(row_label(k), k, groups[k]) for k in keys]
    columns = list(tasks)
    hib = {t: HIGHER_IS_BETTER.get(task_metrics[t], True) for t in tasks}
    same_metric = len(set(task_metrics.values())) == 1
    if same_metric:
        columns.append(AVG)
        hib[AVG] = hib[tasks[0]]

    def task_value(run: RunResult, t: str) -> float:
        return float(run.scores.get(t, {}).get(task_metrics[t], math.nan))

    for row in rows:
        for t in tasks:
            row.values[t] = [task_value(r, t) for r in row.runs]
        if same_metric:
            row.values[AVG] = [float(np.mean([task_value(r, t) for t in tasks])) for r in row.runs]
    ref_rows = [row for row in rows if row.key[0] == "single_task"]
    reference = None
    if ref_rows:
        ref = next((row for row in ref_rows if row.key[2:] == ("ew", "erm", "")), ref_rows[0])
        reference = ref.label
        ref_scores = _reference_scores(ref, tasks, task_metrics, delta_metrics)
        columns += [DELTA_M, DELTA_P]
        hib[DELTA_M], hib[DELTA_P] = False, True
        for row in rows:
            dms = []
            for r in row.runs:
                mine = {t: {m: v for m in ref_scores[t] if math.isfinite(v := r.scores.get(t, {}).get(m, math.nan))}
                        for t in ref_scores}
                mine = {t: ms for t, ms in mine.items() if ms}
                try:
                    dms.append(delta_m(mine, ref_scores) if mine else math.nan)
                except ValueError:
                    dms.append(math.nan)
            row.values[DELTA_M] = dms
            row.values[DELTA_P] = [-d for d in dms]
    return ReportTable(rows, columns, task_metrics, hib, metric, split, checkpoint, reference, delta_metrics)


def _scale(table: ReportTable, col: str) -> float:
    m = table.column_metric(col)
    return 100.0 if m in FRACTION_METRICS else 1.0


def _fmt(v: float, fixed: bool) -> str:
    if not math.isfinite(v):
        return "—"
    return f"{v:.2f}" if fixed else f"{v:.4g}"


def _header(table: ReportTable, col: str) -> str:
    if col == DELTA_M:
        return "Δm% ↓"
    if col == DELTA_P:
        return "Δp% ↑ (LibMTL sign)"
    m = table.column_metric(col)
    return col if m in (None, table.metric) else f"{col} [{m}]"


def to_markdown(table: ReportTable) -> str:
    """The table as Markdown: mean ± std over seeds, best per column in bold."""
    pct = any(_scale(table, c) == 100.0 for c in table.columns)
    n_runs = sum(len(r.runs) for r in table.rows)
    lines = [f"# mola report: {table.split} split, {table.metric}, {table.checkpoint} checkpoint", "",
             f"{n_runs} runs in {len(table.rows)} rows; mean ± std over seeds (n = runs per row)"
             + ("; fractions shown in %" if pct else "") + "; best per column in **bold**."]
    if table.reference:
        over = "each task's column metric" if table.delta_metrics == "primary" else "all metrics of each task"
        lines.append(f"Δm% (lower is better) over {over}, against the mean of `{table.reference}`; Δp% = -Δm%.")
    lines += ["", "| method | n | " + " | ".join(_header(table, c) for c in table.columns) + " |",
              "|---|---:|" + "---:|" * len(table.columns)]
    for row in table.rows:
        cells = []
        for c in table.columns:
            s = _scale(table, c)
            fixed = s == 100.0 or c in (DELTA_M, DELTA_P)
            mean, std, best = row.mean(c), row.std(c), table.best(c)
            text = _fmt(mean * s, fixed) + (f" ± {_fmt(std * s, fixed)}" if math.isfinite(std) else "")
            if math.isfinite(mean) and math.isfinite(best) and abs(mean - best) <= 1e-12 * max(1.0, abs(best)):
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {row.label} | {len(row.runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_column(col: str) -> str:
    return {AVG: "avg", DELTA_M: "delta_m", DELTA_P: "delta_p"}.get(col, col)


def write_csv(table: ReportTable, path: str | Path) -> None:
    """One line per row: identity columns, then ``<column>_mean`` and ``<column>_std`` (raw, unscaled values)."""
    head = ["row", "arch", "mode", "weighting", "method", "override", "n_runs", "seeds"]
    head += [f"{csv_column(c)}_{s}" for c in table.columns for s in ("mean", "std")]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(head)
        for row in table.rows:
            seeds = " ".join(str(r.seed) for r in row.runs)
            vals = []
            for c in table.columns:
                vals += [row.mean(c), row.std(c)]
            w.writerow([row.label, *row.key, len(row.runs), seeds]
                       + ["" if not math.isfinite(v) else repr(float(v)) for v in vals])


def plot_table(table: ReportTable, path: str | Path) -> Path:
    """Grouped bar plot of the task columns and Avg (scaled as in the Markdown table)."""
    from mola.analysis.plots import plot_report_bars

    cols = [c for c in table.columns if c not in (DELTA_M, DELTA_P)]
    means = np.array([[r.mean(c) * _scale(table, c) for c in cols] for r in table.rows])
    stds = np.array([[r.std(c) * _scale(table, c) for c in cols] for r in table.rows])
    metrics = {table.column_metric(c) for c in cols} - {None}
    unit = " (%)" if any(_scale(table, c) == 100.0 for c in cols) else ""
    ylabel = (metrics.pop() if len(metrics) == 1 else "score (each task's metric)") + unit
    return plot_report_bars([r.label for r in table.rows], cols, means, stds, path, ylabel=ylabel)


def write_report(paths: list[str | Path], out_dir: str | Path, split: str = "test", metric: str = "acc",
                 checkpoint: str = "best", delta_metrics: str = "primary") -> tuple[ReportTable, dict[str, Path]]:
    """Load runs, build the table and write report.md, report.csv and report.png into ``out_dir``."""
    runs = [load_run(p, split, checkpoint) for p in find_runs(paths)]
    table = build_table(runs, metric, split, checkpoint, delta_metrics)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"md": out / "report.md", "csv": out / "report.csv", "png": out / "report.png"}
    files["md"].write_text(to_markdown(table))
    write_csv(table, files["csv"])
    plot_table(table, files["png"])
    return table, files


__all__ = ["ReportRow", "ReportTable", "RunResult", "build_table", "find_runs", "load_run", "plot_table",
           "row_label", "to_markdown", "write_csv", "write_report"]
