"""Pair an analysis number (router code task inference, silhouette, weight entropy, ...) of two groups of runs by
seed: mean difference, 95% Student-t interval, wins/losses and a verdict, as ``mola report --paired`` does for
test metrics. Each run folder needs ``config.yaml`` (for its seed) and ``<analysis>/routing.json``
(``mola analyze RUN --split test --out RUN/<analysis>``).

  python examples/paired_analysis.py --method "runs/a/mola_router-s*" --reference "runs/b/router_no_twd-s*" \
      --analysis analysis_test --keys task_inference_accuracy silhouette
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

from mola.analysis.paired import by_seed, paired_difference
from mola.engine.config import load_config


def read_group(pattern: str, analysis: str, keys: list[str]) -> dict[str, dict[int, float]]:
    """``key -> seed -> routing.json[key]`` of the run folders matching ``pattern`` (each file read once)."""
    runs = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_dir())
    if not runs:
        raise SystemExit(f"no run folder matches {pattern!r}")
    seeds, values = [], []
    for run in runs:
        path = run / analysis / "routing.json"
        if not path.is_file():
            raise SystemExit(f"{path} not found: run `mola analyze {run} --out {run / analysis}` first")
        data = json.loads(path.read_text())
        missing = [k for k in keys if k not in data]
        if missing:
            raise SystemExit(f"{path} has no {missing}; keys: {sorted(data)}")
        seeds.append(load_config(run / "config.yaml").train.seed)
        values.append(data)
    return {k: by_seed(seeds, [float(v[k]) for v in values], pattern) for k in keys}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", required=True, help="glob of the method's run folders")
    p.add_argument("--reference", required=True, help="glob of the reference run folders")
    p.add_argument("--analysis", default="analysis", help="analysis folder name inside each run")
    p.add_argument("--keys", nargs="+", default=["task_inference_accuracy", "silhouette"])
    p.add_argument("--lower-is-better", nargs="*", default=["mean_weight_entropy"],
                   help="keys for which a lower value is better")
    args = p.parse_args(argv)
    print("| key | n | method mean | reference mean | diff [95% CI] | W/L | verdict |")
    print("|---|---:|---:|---:|---|---|---|")
    method = read_group(args.method, args.analysis, args.keys)
    reference = read_group(args.reference, args.analysis, args.keys)
    for key in args.keys:
        m, r = method[key], reference[key]
        res = paired_difference(m, r, higher_is_better=key not in args.lower_is_better)
        mm = sum(m[s] for s in res.seeds) / max(1, res.n)
        rm = sum(r[s] for s in res.seeds) / max(1, res.n)
        print(f"| {key} | {res.n} | {mm:.4f} | {rm:.4f} | {res.mean:+.4f} [{res.low:+.4f}, {res.high:+.4f}] "
              f"| {res.wins}/{res.losses} | {res.verdict} |")


if __name__ == "__main__":
    main()
