"""A run folder's owner and its kill points.

``RunLock``: ``RUN_DIR/.mola.lock`` gives a run folder one owner (a stale lock of a dead process is taken over).
Fault injection (for tests of kills at exact instants): ``MOLA_FAULT=POINT[:N]`` makes the process SIGKILL itself
the N-th time (default 1st) it passes the named point; ``FAULT_POINTS`` lists the points.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import warnings
from pathlib import Path

# ------------------------------------------------------------------------------------ fault injection
FAULT_ENV = "MOLA_FAULT"
FAULT_POINTS = ("best.tmp_written", "best.written", "last.tmp_written", "last.prev_kept", "last.written",
                "metrics.written", "final.written")
"""Named instants of a run's writes, in the order an epoch end passes them (``<file>.tmp_written``: temp file
complete, not yet renamed; ``last.prev_kept``: old ``last`` linked to ``last.prev``; ``<file>.written``: renamed)."""
_fault_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process here if ``MOLA_FAULT`` names this point (and this is its N-th pass); else nothing."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, count = spec.partition(":")
    if point != name:
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == (int(count) if count else 1):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


# -------------------------------------------------------------------------------------- run-folder lock
LOCK_NAME = ".mola.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class RunLockedError(RuntimeError):
    """Another live process owns the run folder (its lock names the process)."""


class RunLock:
    """Exclusive ownership of a run folder for the life of a run: ``RUN_DIR/.mola.lock`` holds
    ``pid host``. Another live process's lock is a RuntimeError naming it; a lock left by a process that no
    longer exists (same host) is stale and taken over with a warning. Re-entrant within one process."""

    _held: dict[str, int] = {}

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.key = str(self.path.resolve())

    def _owner(self) -> tuple[int, str] | None:
        try:
            pid, host = self.path.read_text().split()[:2]
            return int(pid), host
        except (OSError, ValueError):
            return None

    def acquire(self) -> RunLock:
        if self._held.get(self.key):
            self._held[self.key] += 1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:  # being written by its owner right now, or garbage: look again, then judge
                    time.sleep(0.05)
                    owner = self._owner()
                    if owner is None:
                        self.path.unlink(missing_ok=True)
                        continue
                pid, host = owner
                if host == socket.gethostname() and (pid == os.getpid() or not _pid_alive(pid)):
                    warnings.warn(f"run folder {self.path.parent}: removing the stale lock of process {pid}, "
                                  "which no longer runs", RuntimeWarning, stacklevel=2)
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunLockedError(f"run folder {self.path.parent} is in use by process {pid} on {host} (lock "
                                   f"{self.path}); wait for it, stop it, or train into another --out. If that "
                                   "process is gone, delete the lock file") from None
            with os.fdopen(fd, "w") as fh:
                fh.write(me)
            self._held[self.key] = 1
            return self
        raise RuntimeError(f"could not take the lock {self.path} of run folder {self.path.parent}")

    def release(self) -> None:
        n = self._held.get(self.key, 0)
        if n > 1:
            self._held[self.key] = n - 1
            return
        self._held.pop(self.key, None)
        if n and self._owner() == (os.getpid(), socket.gethostname()):
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = ["FAULT_ENV", "FAULT_POINTS", "LOCK_NAME", "RunLock", "RunLockedError", "fault_point"]
