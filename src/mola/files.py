"""Atomic file writes: every file mola writes outside checkpoints goes through ``atomic_write``.

A temp file next to the target (``.<name>.<pid>.<random>.tmp``, the pattern ``remove_stale_temp_files`` cleans
up) is written, flushed to disk and renamed over the target, so a reader or a crash never sees half a file.
"""

from __future__ import annotations

import csv
import json
import math
import os
import secrets
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any


def temp_name(path: Path) -> Path:
    """A fresh hidden temp name next to ``path``."""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to fill a temp file next to ``path``, then fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(text: str, path: str | os.PathLike[str]) -> Path:
    """``text`` to ``path``, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as None and numpy scalars as plain numbers (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``obj`` as indented JSON (NaN/inf written as null), atomically."""
    return write_text(json.dumps(json_safe(obj), indent=2), path)


def columns_of(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The keys of ``rows`` in first-seen order."""
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    return list(keys)


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str],
              columns: Sequence[str] | None = None) -> Path:
    """Rows (dicts) to CSV with ``columns`` (default: every key, first-seen order), atomically."""
    cols = list(columns) if columns is not None else columns_of(rows)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)

    return atomic_write(path, write)


__all__ = ["atomic_write", "columns_of", "json_safe", "temp_name", "write_csv", "write_json", "write_text"]
