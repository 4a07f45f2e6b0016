"""Checks the commands run before long work starts: output paths that can be written."""

from __future__ import annotations

import os
from pathlib import Path


def check_writable_dir(path: Path, what: str) -> None:
    """A folder we will write into: not a file, and creatable/writable; checked before long work starts."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder; give a folder path (it is created if missing) "
                         "or move the file away")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: folder {parent} is not writable")


def check_writable_file(path: Path, what: str) -> None:
    """A file we will write: not a folder, in a writable folder; checked before long work starts."""
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder, not a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{what} {path} is not writable")
    check_writable_dir(path.parent if str(path.parent) else Path("."), f"{what} {path}: folder")
