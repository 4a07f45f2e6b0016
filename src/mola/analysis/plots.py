"""PNG figures of the analyses, drawn with matplotlib's Agg canvas (no pyplot, no global backend switch)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974",
          "#64B5CD"]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def plot_singular_values(svals: dict[str, dict[str, Any]], path: str | Path, max_layers: int = 12,
                         title: str = "singular values per MoLA layer (nonzero, flattened Co x Ci*k*k)") -> Path:
    """Box plots per MoLA layer of the nonzero singular values of W0 and W0 + s*dW_e (paper Fig. 4)."""
    names = list(svals)[:max_layers]
    if not names:
        raise ValueError("plot_singular_values needs at least one layer")
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig = _figure(max(6.0, 3.4 * cols), 3.0 * rows)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        labels = list(svals[name])
        data = [np.asarray(svals[name][k], dtype=float) for k in labels]
        box = ax.boxplot(data, patch_artist=True, widths=0.6)
        tilt = {"rotation": 25, "ha": "right"} if len(labels) > 2 else {}
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7, **tilt)
        for patch, color in zip(box["boxes"], COLORS, strict=False):
            patch.set_facecolor(color)
            patch.set_alpha(0.6)
        ax.set_yscale("log")
        ax.set_title(_short(name), fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        if i % cols == 0:
            ax.set_ylabel("singular value")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_pc_proportions(rows: list[dict[str, Any]], path: str | Path, max_experts: int = 8) -> Path:
    """Grouped bars per layer: principal-component proportion k*/n of W0 and of W0 + s*dW_e (paper Fig. 3)."""
    if not rows:
        raise ValueError("plot_pc_proportions needs at least one layer row")
    experts = sorted({int(k[1:-3]) for k in rows[0] if k.startswith("e") and k.endswith("_pc")})[:max_experts]
    keys = [("w0_pc", "W0")] + [(f"e{e}_pc", f"W0+s*dW{e}") for e in experts]
    x = np.arange(len(rows))
    width = 0.8 / len(keys)
    fig = _figure(max(5.0, 0.7 * len(rows) * len(keys) ** 0.5 + 2), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for j, (key, label) in enumerate(keys):
        vals = [float(r[key]) for r in rows]
        ax.bar(x + (j - (len(keys) - 1) / 2) * width, vals, width, label=label, color=COLORS[j % len(COLORS)])
    ax.set_xticks(x, [_short(r["layer"], 20) for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(f"pc proportion k*/n (eps={rows[0].get('eps', 0.99)})")
    ax.set_ylim(0, 1.25)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.legend(fontsize=7, ncol=min(len(keys), 5), loc="upper center")
    ax.set_title("principal-component proportion per MoLA layer", fontsize=9)
    return _save(fig, path)


def plot_params_vs_rank(rows: list[dict[str, Any]], path: str | Path, single_task: int | None = None,
                        current_rank: int | None = None) -> Path:
    """Parameter counts by part against the adapter rank, log-log, with the single-task total as a line (Fig. 5)."""
    if not rows:
        raise ValueError("plot_params_vs_rank needs at least one rank row")
    ranks = [r["rank"] for r in rows]
    parts = [k for k in ("total", "backbone", "adapters", "router", "lift", "heads") if any(r.get(k) for r in rows)]
    fig = _figure(7.2, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    for j, part in enumerate(parts):
        vals = [max(r.get(part, 0), 1) for r in rows]
        ax.plot(ranks, vals, marker="o", label=part, color=COLORS[j % len(COLORS)], lw=2 if part == "total" else 1)
    if single_task is not None:
        ax.axhline(single_task, color="black", ls="--", lw=1, label=f"single-task total ({single_task:,})")
    if current_rank is not None:
        ax.axvline(current_rank, color="gray", ls=":", lw=1, label=f"this run (r={current_rank})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("adapter rank r")
    ax.set_ylabel("parameters")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("parameter counts vs rank", fontsize=9)
    return _save(fig, path)


def plot_router_heatmap(mean_weights: Sequence[Sequence[float | None]], task_names: list[str],
                        path: str | Path, title: str = "mean router weight per task") -> Path:
    """Heat map of the (T, E) mean mixing weights: rows tasks, columns adapters (paper Fig. 6, left)."""
    m = np.array([[np.nan if v is None else v for v in row] for row in mean_weights], dtype=float)
    t, e = m.shape
    fig = _figure(max(3.5, 0.55 * e + 2.2), max(2.5, 0.4 * t + 1.4))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=max(1e-9, float(np.nanmax(m))) if np.isfinite(m).any() else 1.0,
                   aspect="auto")
    ax.set_xticks(range(e), [str(i) for i in range(e)], fontsize=7)
    ax.set_yticks(range(t), [_short(n, 18) for n in task_names], fontsize=7)
    ax.set_xlabel("adapter e")
    ax.set_ylabel("task")
    if t * e <= 400:
        for i in range(t):
            for j in range(e):
                if np.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if m[i, j] < 0.6 * np.nanmax(m) else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_codes(proj: np.ndarray, task_ids: np.ndarray, task_names: list[str], path: str | Path,
               title: str = "router codes z (2-D PCA)") -> Path:
    """Scatter of the 2-D projection of z coloured by task (paper Fig. 6, right)."""
    fig = _figure(5.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for t, name in enumerate(task_names):
        sel = task_ids == t
        if sel.any():
            ax.scatter(proj[sel, 0], proj[sel, 1], s=8, alpha=0.6, color=COLORS[t % len(COLORS)],
                       label=_short(name, 18))
    if (task_ids < 0).any():
        sel = task_ids < 0
        ax.scatter(proj[sel, 0], proj[sel, 1], s=8, alpha=0.6, color="gray", label="all tasks")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=7, markerscale=2)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_report_bars(labels: list[str], columns: list[str], means: np.ndarray, stds: np.ndarray, path: str | Path,
                     ylabel: str = "score") -> Path:
    """Grouped bars: one group per column (task or Avg), one bar per method row, error bars = std over seeds."""
    r, c = means.shape
    x = np.arange(c)
    width = 0.8 / max(1, r)
    fig = _figure(max(5.0, 0.35 * r * c + 2.5) + 2.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for i, label in enumerate(labels):
        err = np.nan_to_num(stds[i], nan=0.0)
        ax.bar(x + (i - (r - 1) / 2) * width, np.nan_to_num(means[i], nan=0.0), width, yerr=err, capsize=2,
               label=label, color=COLORS[i % len(COLORS)], error_kw={"lw": 0.8})
    ax.set_xticks(x, [_short(cn, 16) for cn in columns], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


__all__ = ["plot_codes", "plot_params_vs_rank", "plot_pc_proportions", "plot_report_bars", "plot_router_heatmap",
           "plot_singular_values"]


def plot_conflict_heatmap(cos: np.ndarray, task_names: list[str], path: str | Path, title: str) -> Path:
    """(T, T) cosines of the tasks' mean gradients on one level's shared weights: red = conflict (< 0)."""
    t = cos.shape[0]
    fig = _figure(max(3.5, 0.5 * t + 2.4), max(3.0, 0.45 * t + 1.6))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.where(np.isfinite(cos), cos, np.nan), cmap="RdBu", vmin=-1.0, vmax=1.0)
    ax.set_xticks(range(t), [_short(n, 12) for n in task_names], fontsize=7, rotation=45, ha="right")
    ax.set_yticks(range(t), [_short(n, 12) for n in task_names], fontsize=7)
    if t <= 20:
        for i in range(t):
            for j in range(t):
                if i != j and np.isfinite(cos[i, j]):
                    ax.text(j, i, f"{cos[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if abs(cos[i, j]) > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine of mean gradients")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_gain_vs_conflict(points: Sequence[dict[str, Any]], path: str | Path, xlabel: str, ylabel: str,
                          title: str = "") -> Path:
    """Paired gain (mean with its interval) against measured conflict, one labelled point per scenario/level."""
    fig = _figure(5.2, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for i, p in enumerate(points):
        lo, hi = p["ci_low"], p["ci_high"]
        err = [[p["gain"] - lo], [hi - p["gain"]]] if math.isfinite(lo) and math.isfinite(hi) else None
        ax.errorbar([p["conflict"]], [p["gain"]], yerr=err, fmt="o", capsize=3, color=COLORS[i % len(COLORS)])
        ax.annotate(_short(str(p["label"]), 22), (p["conflict"], p["gain"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.axhline(0.0, color="#888888", lw=0.8, ls="--")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)
