"""Atomic file writes and the tensor checksum: every file mola writes (checkpoints, adapters, CSV/JSON/YAML)
goes through ``atomic_write``; checkpoints and adapter files are verified with ``tensors_sha256``.

A temp file next to the target (``.<name>.<pid>.<random>.tmp``, the pattern ``remove_stale_temp_files`` cleans
up) is written, flushed to disk and renamed over the target, then the folder is flushed, so a reader or a crash
never sees half a file.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import secrets
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch


def temp_name(path: Path) -> Path:
    """A fresh hidden temp name next to ``path``."""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder after a rename) to disk; folders that cannot be opened are skipped
    (some platforms; the rename is still atomic)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def keep_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` hold the current content of ``src`` (a hard link, a copy where links are not supported),
    atomically replacing any old ``dst``."""
    tmp = temp_name(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            tmp.write_bytes(src.read_bytes())
            _fsync(tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object], *,
                 keep_previous: str | os.PathLike[str] | None = None,
                 on_step: Callable[[str], None] | None = None) -> Path:
    """Call ``write(tmp)`` to fill a temp file next to ``path``, fsync it, rename it over ``path`` and fsync
    the folder: never half-written. With ``keep_previous``, an existing ``path`` is first kept under that name
    (``keep_copy``), so the old content survives and ``path`` never disappears. ``on_step`` is called with
    "tmp_written", "prev_kept" (with ``keep_previous``) and "written" as the write gets there (the checkpoint
    writer's fault-injection points)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    step = on_step or (lambda _: None)
    tmp = temp_name(path)
    try:
        write(tmp)
        _fsync(tmp)
        step("tmp_written")
        if keep_previous is not None and path.exists():
            keep_copy(path, Path(keep_previous))
            step("prev_kept")
        os.replace(tmp, path)
        _fsync(path.parent)
        step("written")
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes(data: bytes, path: str | os.PathLike[str], **options: Any) -> Path:
    """``data`` to ``path``, atomically (``options``: ``atomic_write``'s ``keep_previous``, ``on_step``)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), **options)


def tensors_sha256(header: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of ``header`` (a file's JSON skeleton or config) and every tensor's key, dtype, shape and bytes
    (keys sorted): the checksum of checkpoint and adapter files, so truncation or a flipped bit is detected."""
    h = hashlib.sha256(header.encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"\0{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


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


__all__ = ["atomic_write", "columns_of", "json_safe", "keep_copy", "temp_name", "tensors_sha256", "write_bytes",
           "write_csv", "write_json", "write_text"]
