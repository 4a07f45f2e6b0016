"""Training logs without per-step host syncs: running sums stay on the device and are read once per logging
interval (``train.log_every_steps``) and once per epoch; rows go to metrics.csv and TensorBoard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mola.files import write_csv


class RunningMeans:
    """Means of named scalars (0-d tensors on any device, or floats) over the steps since the last ``read``."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor | float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, Any]) -> None:
        """Add one step's values; tensors are summed where they live (no host sync)."""
        for k, v in values.items():
            v = v.detach().float() if isinstance(v, Tensor) else float(v)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1

    def state(self) -> dict[str, Any]:
        """Sums and counts (for a mid-epoch checkpoint)."""
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load(self, state: dict[str, Any] | None) -> None:
        """Continue from ``state()`` (None: start empty)."""
        self.sums = dict(state["sums"]) if state else {}
        self.counts = {k: int(v) for k, v in state["counts"].items()} if state else {}

    def read(self) -> dict[str, float]:
        """The means so far (one host sync per device for all tensor values together), then start over."""
        values = {k: v for k, v in self.sums.items() if not isinstance(v, Tensor)}
        by_device: dict[torch.device, list[str]] = {}
        for k, v in self.sums.items():
            if isinstance(v, Tensor):
                by_device.setdefault(v.device, []).append(k)
        for keys in by_device.values():
            read = torch.stack([torch.as_tensor(self.sums[k]).reshape(()) for k in keys]).tolist()
            values.update(zip(keys, read, strict=True))
        out = {k: float(values[k]) / self.counts[k] for k in self.sums}
        self.sums, self.counts = {}, {}
        return out


def tensorboard(run_dir: Path) -> Any:
    """A SummaryWriter for ``run_dir/tb``, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but keep the loop usable without it
        return None
    return SummaryWriter(str(run_dir / "tb"))


def write_metrics(history: list[dict[str, Any]], run_dir: Path) -> None:
    """``run_dir/metrics.csv``: one row per epoch, every column seen in any row, atomically."""
    write_csv(history, run_dir / "metrics.csv")


def _val_metric(row: dict[str, Any], task: str) -> str | None:
    """The metric shown for ``task``: acc when it has one, else its first val metric other than the loss."""
    names = [k.split("/", 2)[2] for k in row if k.startswith(f"val/{task}/") and not k.endswith("/loss")]
    return "acc" if "acc" in names else (names[0] if names else None)


def epoch_line(row: dict[str, Any], tasks: list[str], epochs: int, best: bool) -> str:
    """One line per epoch: train loss and the val metric of every task (``mola train`` prints it, with or
    without a progress bar)."""
    loss = " ".join(f"{t} {row[f'train/{t}/loss']:.3f}" for t in tasks if f"train/{t}/loss" in row)
    vals = []
    for t in tasks:
        m = _val_metric(row, t)
        if m is not None:
            vals.append(f"{t} {m} {row[f'val/{t}/{m}']:.4f}")
    return (f"epoch {row['epoch'] + 1}/{epochs}: train loss {loss} | val {' '.join(vals)} "
            f"({row['seconds']:.1f} s{', best so far' if best else ''})")


def write_curves(history: list[dict[str, Any]], tasks: list[str], path: Path) -> None:
    """``curves.png``: train (solid) and val (dashed) loss per task, and the val metric per task, per epoch
    (from 2 epochs on: one point is no curve)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mola.files import atomic_write

    if len(history) < 2:
        return
    epochs = [r["epoch"] + 1 for r in history]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    loss_ax, metric_ax = fig.subplots(1, 2)
    for i, t in enumerate(tasks):
        colour = f"C{i % 10}"
        for key, style in ((f"train/{t}/loss", "-"), (f"val/{t}/loss", "--")):
            ys = [r.get(key) for r in history]
            if any(y is not None for y in ys):
                loss_ax.plot(epochs, ys, style, color=colour, marker=".",
                             label=f"{t} {'train' if style == '-' else 'val'}")
        m = _val_metric(history[-1], t)
        if m is not None:
            metric_ax.plot(epochs, [r.get(f"val/{t}/{m}") for r in history], "-", color=colour, marker=".",
                           label=f"{t} {m}")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss per task (train solid, val dashed)")
    metric_ax.set(xlabel="epoch", ylabel="val metric", title="validation metric per task")
    from matplotlib.ticker import MaxNLocator

    for ax in (loss_ax, metric_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.9, wspace=0.2)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))


__all__ = ["RunningMeans", "epoch_line", "tensorboard", "write_curves", "write_metrics"]
