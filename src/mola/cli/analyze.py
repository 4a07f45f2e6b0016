"""``mola analyze RUN_DIR``: spectra, parameter counts and routing analyses of a trained run (docs/results.md)."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_analyze(args: argparse.Namespace) -> int:
    from mola.analysis.run import analyze_run, format_summary

    summary = analyze_run(args.run_dir, checkpoint=args.checkpoint, eps=args.eps, split=args.split,
                          out_dir=args.out, device=args.device, compare=tuple(args.compare),
                          overrides=args.overrides, progress=True)
    print(format_summary(summary))
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``mola analyze``."""
    p = subparsers.add_parser(
        "analyze", help="weight spectra, parameter counts and router analyses of a trained run",
        description="Load RUN_DIR's config and checkpoint and write RUN_DIR/analysis/{spectra.csv, params.json, "
                    "routing.json, *.png}. Spectra need arch mola; routing needs model.mola.mode=router.")
    p.add_argument("run_dir", help="a run directory written by `mola train`")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best", help="which checkpoint to analyse")
    p.add_argument("--eps", type=float, default=0.99, help="energy share for the principal-component proportion")
    p.add_argument("--split", choices=["train", "val", "test"], default="val",
                   help="split whose router codes are scored (task centroids always come from train)")
    p.add_argument("--compare", action="append", default=[], metavar="RUN_DIR",
                   help="another run (e.g. HPS without MoLA, or a higher-rank MoLA run) whose matching layer "
                        "spectra are put beside this run's; repeatable")
    p.add_argument("--out", help="output folder (default RUN_DIR/analysis)")
    p.add_argument("--device", default="cpu", help="device to load the model on (default cpu)")
    p.add_argument("overrides", nargs="*", metavar="data.root=PATH",
                   help="where the run's data is now, if it moved since training")
    p.set_defaults(func=cmd_analyze)
