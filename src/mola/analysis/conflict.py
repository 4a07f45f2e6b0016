"""Files of a conflict measurement: conflict.csv, one heatmap per level, a one-screen summary (docs/conflict.md)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from mola.analysis.plots import plot_conflict_heatmap
from mola.engine.conflict import ALL, CSV_COLUMNS, STAGE, ConflictResult
from mola.files import write_csv, write_json, write_text


def level_file(level: str) -> str:
    """A file-name-safe stem for a level (``stage:layer4`` -> ``stage_layer4``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", level)


def _fmt(v: Any) -> str:
    return "nan" if not isinstance(v, (int, float)) or not math.isfinite(v) else f"{v:+.3f}"


def format_conflict_summary(result: ConflictResult, rows: list[dict[str, Any]], header: str = "",
                            top: int = 5) -> str:
    """The most conflicting pairs (lowest cosine on ALL, with interval) and the levels with the lowest mean
    pair cosine; a pair counts as conflicting when its whole interval is below 0."""
    lines = [header] if header else []
    overall = [r for r in rows if r["layer"] == ALL]
    sig = [r for r in overall if math.isfinite(r["ci_high"]) and r["ci_high"] < 0]
    agree = [r for r in overall if math.isfinite(r["ci_low"]) and r["ci_low"] > 0]
    cos = np.array([r["cosine"] for r in overall], dtype=float)
    mean = float(np.nanmean(cos)) if np.isfinite(cos).any() else math.nan
    lines.append(f"ALL shared weights: mean pair cosine {_fmt(mean)} over {len(overall)} pairs, "
                 f"{len(sig)} conflicting (interval below 0), {len(agree)} aligned (interval above 0); "
                 f"K = {result.num_batches} batches")
    lines.append("most conflicting pairs (ALL):")
    for r in sorted(overall, key=lambda r: r["cosine"] if math.isfinite(r["cosine"]) else math.inf)[:top]:
        lines.append(f"  {r['task_a']:>14} / {r['task_b']:<14} cos {_fmt(r['cosine'])} "
                     f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]  neg {r['neg_fraction']:.2f}  "
                     f"|g_a|/|g_b| {r['norm_ratio']:.2f}")
    by_level: dict[str, list[float]] = {}
    for r in rows:
        if r["layer"] != ALL and math.isfinite(r["cosine"]):
            by_level.setdefault(r["layer"], []).append(r["cosine"])
    if by_level:
        lines.append("levels by mean pair cosine (lowest first):")
        for level, vals in sorted(by_level.items(), key=lambda kv: float(np.mean(kv[1])))[:top]:
            kind = "stage" if level.startswith(STAGE) else "layer"
            lines.append(f"  {level:<28} {kind}  mean {_fmt(float(np.mean(vals)))}  min {_fmt(float(np.min(vals)))}  "
                         f"({result.sizes[level]:,} weights)")
    return "\n".join(lines)


def write_conflict(result: ConflictResult, out_dir: str | Path, meta: dict[str, Any], confidence: float = 0.95,
                   plots: bool = True) -> tuple[list[dict[str, Any]], str]:
    """Write conflict.csv, conflict.json (settings), summary.txt and conflict_<level>.png into ``out_dir``;
    returns the rows and the summary text."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = result.rows(confidence=confidence, seed=int(meta.get("seed", 0)))
    clean = [{k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in r.items()} for r in rows]
    write_csv(clean, out / "conflict.csv", CSV_COLUMNS)
    header = (f"task conflict of {meta.get('name', 'model')} at {meta.get('weights', '?')} weights "
              f"(cosine of per-task mean loss gradients on the shared weights W0)")
    summary = format_conflict_summary(result, clean, header)
    write_text(summary + "\n", out / "summary.txt")
    write_json({**meta, "tasks": result.tasks, "levels": {k: result.sizes[k] for k in result.levels()},
                "confidence": confidence,
                "interval": "basic (reverse-percentile) bootstrap over the K batches (2000 resamples)"},
               out / "conflict.json")
    if plots:
        for level in result.levels():
            plot_conflict_heatmap(result.cosine_matrix(level), result.tasks, out / f"conflict_{level_file(level)}.png",
                                  f"{level}: cosine of mean task gradients (K={result.num_batches})")
    return clean, summary


__all__ = ["format_conflict_summary", "level_file", "write_conflict"]
