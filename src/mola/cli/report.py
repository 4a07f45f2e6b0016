"""``mola report RUN_DIR...``: one table over many runs (mean +/- std over seeds), as Markdown, CSV and PNG."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_report(args: argparse.Namespace) -> int:
    from mola.analysis.report import write_report

    out = args.out or (Path(args.run_dirs[0]) / "report" if len(args.run_dirs) == 1 else Path("report"))
    _, files = write_report(args.run_dirs, out, split=args.split, metric=args.metric, checkpoint=args.checkpoint,
                            delta_metrics=args.delta_metrics, paired=args.paired, confidence=args.confidence,
                            allow_diff=args.allow_diff)
    print(files["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``mola report``."""
    p = subparsers.add_parser(
        "report", help="table of many runs: rows = arch/mode/weighting/method/override, mean +/- std over seeds",
        description="Group finished runs (final.json) into method rows and write report.md, report.csv and "
                    "report.png. A folder of runs (e.g. a sweep's out_dir) is expanded. Delta_m is added when a "
                    "single_task row is present. Runs of different scenarios (data config) get separate tables; runs "
                    "pooled as seeds of one row must differ only by seed. --paired REF adds, per method, task, Avg "
                    "and Delta_m, the mean difference to row REF paired by seed, its Student-t interval, "
                    "wins/losses and a verdict (better / worse / unresolved).")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories or folders of runs")
    p.add_argument("--out", help="output folder (default RUN_DIR/report for one RUN_DIR, else ./report)")
    p.add_argument("--split", choices=["val", "test"], default="test", help="which split's scores to tabulate")
    p.add_argument("--metric", default="acc",
                   help="metric per task (default acc); tasks without it use their primary metric")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best",
                   help="scores of the best-on-val checkpoint or of the last epoch")
    p.add_argument("--delta-metrics", choices=["primary", "all"], default="primary",
                   help="Delta_m over each task's shown metric (as final.json) or over all its metrics (NYUv2 style)")
    p.add_argument("--paired", metavar="REF",
                   help="compare every row with row REF paired by seed (a row label, a sweep variant name such as "
                        "uniform or single_task, or an arch); writes paired.csv")
    p.add_argument("--allow-diff", action="append", default=[], metavar="KEY",
                   help="with --paired: let paired rows differ in config KEY (a dotted key or section, e.g. "
                        "train.epochs); repeatable. Without it, rows that differ by more than seed and method are "
                        "refused")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level of the paired interval")
    p.set_defaults(func=cmd_report)
