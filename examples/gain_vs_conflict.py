"""Gain of a method over a reference (paired by seed) against the measured task conflict, one point per scenario
or knob level: a Markdown table, ``gain_vs_conflict.csv`` and ``gain_vs_conflict.png`` (docs/conflict.md).

Each point names the method's and the reference's run folders (globs; the score is final.json's mean test
metric over tasks, paired by ``train.seed``) and a ``mola conflict`` output folder (its conflict.csv; the
conflict value is the mean pair cosine on ``--level``, lower = more conflict). ``--contrast A B`` pairs the
per-seed gains of points A and B by seed (gain_A - gain_B), the test of "the gain grows with conflict".

  python examples/gain_vs_conflict.py --out premise/ --metric acc \\
      --point shift0 "runs/k/shift0-mola_grad-s*" "runs/k/shift0-uniform-s*" runs/k/shift0-uniform-s0/conflict \\
      --point shift1 "runs/k/shift100-mola_grad-s*" "runs/k/shift100-uniform-s*" runs/k/shift100-uniform-s0/conflict \\
      --contrast shift1 shift0
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
from pathlib import Path

from mola.analysis.paired import by_seed, paired_difference
from mola.analysis.plots import plot_gain_vs_conflict
from mola.engine.config import load_config
from mola.files import write_csv


def scores(pattern: str, metric: str) -> dict[int, float]:
    """seed -> final.json's mean test ``metric`` of the run folders matching ``pattern``."""
    runs = sorted(Path(p) for p in glob.glob(pattern) if (Path(p) / "final.json").is_file())
    if not runs:
        raise SystemExit(f"no finished run folder (with final.json) matches {pattern!r}")
    seeds, values = [], []
    for run in runs:
        final = json.loads((run / "final.json").read_text())
        value = (final.get("mean", {}).get("test") or {}).get(metric)
        if value is None:
            raise SystemExit(f"{run / 'final.json'} has no mean test {metric!r}")
        seeds.append(load_config(run / "config.yaml").train.seed)
        values.append(float(value))
    return by_seed(seeds, values, pattern)


def conflict(folder: str, level: str) -> float:
    """Mean pair cosine at ``level`` of a ``mola conflict`` output folder."""
    path = Path(folder) / "conflict.csv"
    if not path.is_file():
        raise SystemExit(f"{path} not found: run `mola conflict --checkpoint RUN --out {folder}` first")
    with open(path) as fh:
        cos = [float(r["cosine"]) for r in csv.DictReader(fh) if r["layer"] == level and r["cosine"] not in ("", "nan")]
    if not cos:
        raise SystemExit(f"{path} has no finite cosine at level {level!r}")
    return sum(cos) / len(cos)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--point", nargs=4, action="append", required=True,
                   metavar=("LABEL", "METHOD_GLOB", "REFERENCE_GLOB", "CONFLICT_DIR"))
    p.add_argument("--contrast", nargs=2, action="append", default=[], metavar=("A", "B"),
                   help="pair the per-seed gains of points A and B (gain_A - gain_B)")
    p.add_argument("--metric", default="acc", help="final.json mean test metric (higher is better)")
    p.add_argument("--level", default="ALL", help="conflict level (default ALL)")
    p.add_argument("--scale", type=float, default=100.0, help="multiply gains by this (100: points)")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gains: dict[str, dict[int, float]] = {}
    rows = []
    print("| point | conflict (mean pair cosine) | n | gain [95% CI] | W/L | verdict |")
    print("|---|---:|---:|---|---|---|")
    for label, method, reference, folder in args.point:
        m, r = scores(method, args.metric), scores(reference, args.metric)
        res = paired_difference(m, r)
        gains[label] = {s: (m[s] - r[s]) * args.scale for s in res.seeds}
        c = conflict(folder, args.level)
        rows.append({"label": label, "conflict": c, "gain": res.mean * args.scale, "ci_low": res.low * args.scale,
                     "ci_high": res.high * args.scale, "n": res.n, "wins": res.wins, "losses": res.losses,
                     "verdict": res.verdict})
        print(f"| {label} | {c:+.3f} | {res.n} | {res.mean * args.scale:+.2f} [{res.low * args.scale:+.2f}, "
              f"{res.high * args.scale:+.2f}] | {res.wins}/{res.losses} | {res.verdict} |")
    for a, b in args.contrast:
        if a not in gains or b not in gains:
            raise SystemExit(f"--contrast {a} {b}: both must be --point labels ({', '.join(gains)})")
        res = paired_difference(gains[a], gains[b])
        print(f"\ncontrast gain[{a}] - gain[{b}], paired by seed: {res.mean:+.2f} [{res.low:+.2f}, {res.high:+.2f}], "
              f"n {res.n}, {res.wins}/{res.losses}: {res.verdict}")
        rows.append({"label": f"{a} - {b}", "conflict": math.nan, "gain": res.mean, "ci_low": res.low,
                     "ci_high": res.high, "n": res.n, "wins": res.wins, "losses": res.losses, "verdict": res.verdict})
    write_csv(rows, out / "gain_vs_conflict.csv")
    plot_gain_vs_conflict([r for r in rows if math.isfinite(r["conflict"])], out / "gain_vs_conflict.png",
                          f"conflict: mean pair cosine on {args.level} (lower = more conflict)",
                          f"paired gain ({args.metric}, x{args.scale:g})")
    print(f"\nwrote {out / 'gain_vs_conflict.csv'} and {out / 'gain_vs_conflict.png'}")


if __name__ == "__main__":
    main()
