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


__all__ = ["RunningMeans", "tensorboard", "write_metrics"]
