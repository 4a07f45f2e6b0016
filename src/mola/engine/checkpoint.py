"""Atomic checkpoints (temp file + fsync + rename) holding only tensors and plain values, loaded with
``weights_only=True`` (no pickled code), plus the RNG states needed for an exact resume."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors/plain values (weights_only-loadable)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over ``path``: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


CHECKPOINT_NAMES = ("best", "last")


def checkpoint_path(run_or_path: str | Path, which: str = "best") -> Path:
    """The checkpoint file of a run directory (``which`` = best/last), or ``run_or_path`` itself if it is a file.

    The one place that knows checkpoint file names: callers never build ``checkpoints/...`` paths themselves."""
    path = Path(run_or_path)
    if path.is_file():
        return path
    if which not in CHECKPOINT_NAMES:
        raise ValueError(f"checkpoint must be one of {', '.join(CHECKPOINT_NAMES)}, got {which!r}")
    return path / "checkpoints" / f"{which}.pt"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by ``atomic_save`` without executing pickled code; corrupt -> ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (is {path.parent.parent} a mola run directory?)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for truncated/corrupt files
        raise ValueError(f"checkpoint {path} is corrupt or truncated: {err}") from err
    if not isinstance(obj, dict) or obj.get("format") != "mola-checkpoint":
        raise ValueError(f"{path} is not a mola checkpoint")
    return obj
