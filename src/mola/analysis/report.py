"""Result tables over many runs: rows = (arch, mode, weighting, method, override) groups, mean +/- std over
seeds, columns = tasks + Avg (+ Delta_m / Delta_p against a single_task row), optionally paired by seed against a
reference row. Reads ``final.json`` and ``config.yaml``: runs of different scenarios go to separate tables, and
runs pooled into one row must differ only by seed."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mola.analysis.paired import MIN_PAIRS, PairedResult, by_seed, paired_difference
from mola.analysis.results import (
    GroupKey,
    RunResult,
    check_paired,
    check_pooled,
    find_runs,
    read_run_result,
    scenario_key,
    split_by_scenario,
)
from mola.metrics import HIGHER_IS_BETTER, delta_m

FRACTION_METRICS = frozenset({"acc", "auc", "miou", "pix_acc", "within_11.25", "within_22.5", "within_30"})
AUTO_METRICS = ("acc", "miou", "abs_err", "mean")
AVG, DELTA_M, DELTA_P = "Avg", "Delta_m", "Delta_p"


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

    def param_count(self) -> float | None:
        """Trainable parameters of the row's runs (their mean when they differ; None when unknown)."""
        vals = [r.params for r in self.runs if r.params is not None]
        return float(np.mean(vals)) if vals else None

    def params(self) -> str:
        """``param_count`` for tables: "—" when unknown, "~" in front of a mean of differing counts."""
        count = self.param_count()
        if count is None:
            return "—"
        same = len({r.params for r in self.runs if r.params is not None}) == 1
        return f"{round(count):,}" if same else f"~{round(count):,}"

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


def _group_rows(runs: list[RunResult]) -> list[ReportRow]:
    """One row per group key (arch, weighting, ...), single_task first, then in input order; pooled runs checked."""
    groups: dict[GroupKey, list[RunResult]] = {}
    for r in runs:
        groups.setdefault(r.key, []).append(r)
    keys = sorted(groups, key=lambda k: k[0] != "single_task")  # stable: single_task first, then input order
    rows = [ReportRow(row_label(k), k, groups[k]) for k in keys]
    for row in rows:
        check_pooled(row.runs, row.label)
    return rows


def _run_delta_m(run: RunResult, ref_scores: dict[str, dict[str, float]]) -> float:
    """Delta_m of one run against the reference scores over the finite metrics both have (NaN if none)."""
    mine = {t: {m: v for m in ref_scores[t] if math.isfinite(v := run.scores.get(t, {}).get(m, math.nan))}
            for t in ref_scores}
    mine = {t: ms for t, ms in mine.items() if ms}
    try:
        return delta_m(mine, ref_scores) if mine else math.nan
    except ValueError:
        return math.nan


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
    rows = _group_rows(runs)
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
            dms = [_run_delta_m(r, ref_scores) for r in row.runs]
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
    lines += ["", "| method | n | trainable params | " + " | ".join(_header(table, c) for c in table.columns) + " |",
              "|---|---:|---:|" + "---:|" * len(table.columns)]
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
        mark = (" †" if any(r.selected_on_test for r in row.runs) else "") + \
            (" ‡" if any(r.missing_eval for r in row.runs) else "")
        lines.append(f"| {row.label}{mark} | {len(row.runs)} | {row.params()} | " + " | ".join(cells) + " |")
    if any(r.selected_on_test for row in table.rows for r in row.runs):
        lines += ["", "† checkpoint selected on the test split (train.select_on=test_loss, the paper's protocol): "
                  "its test scores are not a held-out estimate."]
    missing = {f"{split}: {', '.join(names)}" for row in table.rows for r in row.runs
               for split, names in r.missing_eval.items()}
    if missing:
        lines += ["", f"‡ trained with train.allow_missing_eval: some tasks/domains had no rows to evaluate on "
                  f"({'; '.join(sorted(missing))}); they are absent from selection, their columns and the means."]
    return "\n".join(lines) + "\n"


def csv_column(col: str) -> str:
    return {AVG: "avg", DELTA_M: "delta_m", DELTA_P: "delta_p"}.get(col, col)


def write_csv(tables: ReportTable | list[ReportTable], path: str | Path) -> None:
    """One line per row: identity columns, then ``<column>_mean`` and ``<column>_std`` (raw, unscaled values);
    with several tables (scenarios) a ``scenario`` column says which, and the columns are their union."""
    tables = [tables] if isinstance(tables, ReportTable) else tables
    columns: list[str] = []
    for t in tables:
        columns += [c for c in t.columns if c not in columns]
    head = ["row", "arch", "mode", "weighting", "method", "override", "n_runs", "seeds", "trainable_params"]
    head += ["scenario"] if len(tables) > 1 else []
    head += [f"{csv_column(c)}_{s}" for c in columns for s in ("mean", "std")]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(head)
        for table in tables:
            for row in table.rows:
                seeds = " ".join(str(r.seed) for r in row.runs)
                vals = []
                for c in columns:
                    vals += [row.mean(c), row.std(c)]
                count = row.param_count()
                w.writerow([row.label, *row.key, len(row.runs), seeds, "" if count is None else round(count)]
                           + ([scenario_title(table)] if len(tables) > 1 else [])
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


@dataclass
class PairedRow:
    """One method against the reference row: a PairedResult per column (tasks, Avg, Delta_m)."""

    label: str
    results: dict[str, PairedResult]


def find_reference(table: ReportTable, ref: str) -> ReportRow:
    """The row named ``ref``: its label, its sweep override label or one value of it (``erm`` of ``erm,e20``), or
    its arch, when exactly one row has it."""
    for match in (lambda r: r.label == ref, lambda r: r.key[4] == ref, lambda r: ref in r.key[4].split(","),
                  lambda r: r.key[0] == ref):
        rows = [r for r in table.rows if match(r)]
        if len(rows) == 1:
            return rows[0]
        if len(rows) > 1:
            raise ValueError(f"--paired {ref!r} matches several rows ({', '.join(r.label for r in rows)}); "
                             "give the full row label")
    names = sorted({r.label for r in table.rows} | {r.key[4] for r in table.rows if r.key[4]})
    raise ValueError(f"--paired {ref!r} names no row of the report; rows: {', '.join(names)}")


def paired_rows(table: ReportTable, ref: str, confidence: float = 0.95,
                allow_diff: Sequence[str] = ()) -> tuple[ReportRow, list[PairedRow]]:
    """Pair every other row with the reference row by seed, per task column, Avg and Delta_m (docs/results.md).
    Rows whose configs differ from the reference's by more than seed and method are refused (``check_paired``)
    unless the keys are in ``allow_diff``."""
    base = find_reference(table, ref)
    for row in table.rows:
        if row is not base:
            check_paired(base.runs, row.runs, row.label, allow_diff)
    cols = [c for c in table.columns if c != DELTA_P]
    out = []
    for row in table.rows:
        if row is base:
            continue
        res = {}
        for c in cols:
            mine = by_seed([r.seed for r in row.runs], row.values[c], f"row {row.label!r}")
            theirs = by_seed([r.seed for r in base.runs], base.values[c], f"row {base.label!r}")
            res[c] = paired_difference(mine, theirs, table.higher_better[c], confidence)
        out.append(PairedRow(row.label, res))
    return base, out


def _paired_cell(table: ReportTable, col: str, r: PairedResult) -> tuple[str, str]:
    s = _scale(table, col)
    ci = f"[{r.low * s:+.2f}, {r.high * s:+.2f}]" if math.isfinite(r.low) else "—"
    return (f"{r.mean * s:+.2f}" if math.isfinite(r.mean) else "—"), ci


def paired_markdown(table: ReportTable, base: ReportRow, rows: list[PairedRow]) -> str:
    """The paired comparison as Markdown: a summary (Avg and Δm per method), then one line per (method,
    column); differences signed so that + is better."""
    lines = [f"## Paired by seed against `{base.label}`", "",
             "diff = method - reference per shared seed, signed so that + is better (for Δm: reference - method); "
             "tasks and Avg in points, Δm in %; 95% Student-t interval over seeds; W/L = seeds won/lost; "
             f"verdict: better / worse when the interval excludes 0 (and n >= {MIN_PAIRS}), else unresolved; "
             f"the reference has {base.params()} trainable parameters.", ""]
    summary = [c for c in (AVG, DELTA_M) if c in table.columns]
    params = {row.label: row.params() for row in table.rows}
    if summary:
        lines += ["| method | n | trainable params | " + " | ".join(
                      f"{'Δm%' if c == DELTA_M else c} diff [95% CI], W/L: verdict" for c in summary) + " |",
                  "|---|---:|---:|" + "---|" * len(summary)]
        for pr in rows:
            cells = []
            for c in summary:
                r = pr.results[c]
                mean, ci = _paired_cell(table, c, r)
                cells.append(f"{mean} {ci}, {r.wins}/{r.losses}: **{r.verdict}**")
            lines.append(f"| {pr.label} | {pr.results[summary[0]].n} | {params.get(pr.label, '—')} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    lines += ["| method | column | n | mean diff | 95% CI | W/L | verdict |", "|---|---|---:|---:|---|---:|---|"]
    for pr in rows:
        for c, r in pr.results.items():
            mean, ci = _paired_cell(table, c, r)
            name = "Δm%" if c == DELTA_M else c
            lines.append(f"| {pr.label} | {name} | {r.n} | {mean} | {ci} | {r.wins}/{r.losses} | {r.verdict} |")
    return "\n".join(lines) + "\n"


def write_paired_csv(table: ReportTable, base: ReportRow, rows: list[PairedRow], path: str | Path) -> None:
    """paired.csv: one line per (method, column) with raw (unscaled, "+ = better") differences."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "reference", "column", "n", "seeds", "mean_diff", "ci_low", "ci_high", "wins",
                    "losses", "ties", "verdict"])
        for pr in rows:
            for c, r in pr.results.items():
                w.writerow([pr.label, base.label, csv_column(c), r.n, " ".join(map(str, r.seeds)),
                            *(repr(v) if math.isfinite(v) else "" for v in (r.mean, r.low, r.high)),
                            r.wins, r.losses, r.ties, r.verdict])


def scenario_title(table: ReportTable) -> str:
    """The scenario that a table's runs share, for headings ("" when the runs carry no config)."""
    return scenario_key(table.rows[0].runs[0])


def write_report(paths: list[str | Path], out_dir: str | Path, split: str = "test", metric: str = "acc",
                 checkpoint: str = "best", delta_metrics: str = "primary", paired: str | None = None,
                 confidence: float = 0.95, allow_diff: Sequence[str] = ()) -> tuple[list[ReportTable], dict[str, Path]]:
    """Load runs, build one table per scenario (and, with ``paired``, the paired comparison against that row)
    and write report.md, report.csv, report.png (report_<k>.png / paired_<k>.csv with several scenarios) and
    paired.csv into ``out_dir``. Every table and comparison is built before the first file is written, so a
    refused report leaves no partial output."""
    runs = [read_run_result(p, split, checkpoint) for p in find_runs(paths)]
    tables = [build_table(group, metric, split, checkpoint, delta_metrics) for group in split_by_scenario(runs)]
    pairs = [paired_rows(table, paired, confidence, allow_diff) if paired is not None else None for table in tables]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"md": out / "report.md", "csv": out / "report.csv"}
    parts = []
    for k, (table, pair) in enumerate(zip(tables, pairs, strict=True)):
        suffix = "" if len(tables) == 1 else f"_{k + 1}"
        title = scenario_title(table)
        md = to_markdown(table)
        if len(tables) > 1:
            md = md.replace("# mola report:", f"# mola report {k + 1}/{len(tables)} ({title}):", 1)
        if pair is not None:
            base, prows = pair
            md += "\n" + paired_markdown(table, base, prows)
            files[f"paired{suffix}"] = out / f"paired{suffix}.csv"
            write_paired_csv(table, base, prows, files[f"paired{suffix}"])
        parts.append(md)
        files[f"png{suffix}"] = out / f"report{suffix}.png"
        plot_table(table, files[f"png{suffix}"])
    files["md"].write_text("\n".join(parts))
    write_csv(tables, files["csv"])
    return tables, files


__all__ = ["PairedRow", "ReportRow", "ReportTable", "RunResult", "build_table", "find_runs", "paired_markdown",
           "paired_rows", "plot_table", "read_run_result", "row_label", "to_markdown", "write_csv", "write_report"]
