"""Checkpoints: one safetensors file each, written atomically, verified by sha256, never unpickled.

Format (``checkpoints/{best,last,last.prev}.safetensors``): every tensor of the training state (model weights
under ``model/<name>``, method buffers, optimizer and scheduler tensors, RNG states) is a safetensors tensor;
everything else (config, epoch, step, sampler position, history, ...) is a JSON skeleton in the safetensors
metadata, in which each tensor appears as ``{"__tensor__": key}``. The metadata also holds the sha256 of the
skeleton plus every tensor's key, dtype, shape and bytes, so a truncated or bit-flipped file is detected.

Writing: serialize in memory, write a temp file in the same folder, fsync, rename over the target, fsync the
folder. ``last`` keeps its predecessor as ``last.prev`` (a hard link to the old file, made before the rename),
so a kill at any moment leaves at least one good ``last`` and a corrupt newest one can be skipped on resume.

``checkpoint_path`` is the one place that knows file names; ``load_checkpoint`` reads any of them (and the
legacy ``.pt`` files of older runs, with ``torch.load(weights_only=True)``).

Fault injection (``MOLA_FAULT``, ``fault_point``) and the run-folder lock (``RunLock``) live in
``mola.engine.runfolder`` and are re-exported here.
"""

from __future__ import annotations

import io
import json
import os
import random
import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mola.engine.runfolder import FAULT_ENV as FAULT_ENV  # re-exported: the kill points and lock live there
from mola.engine.runfolder import FAULT_POINTS as FAULT_POINTS
from mola.engine.runfolder import LOCK_NAME as LOCK_NAME
from mola.engine.runfolder import RunLock as RunLock
from mola.engine.runfolder import RunLockedError as RunLockedError
from mola.engine.runfolder import fault_point
from mola.files import tensors_sha256, write_bytes

FORMAT = "mola-checkpoint"
VERSION = "2"
SUFFIX = ".safetensors"
LEGACY_SUFFIX = ".pt"
CHECKPOINT_NAMES = ("best", "last")
PREVIOUS = "last.prev"
"""File stem of the checkpoint ``last`` replaced most recently (the resume fallback)."""


# ------------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors/plain values (JSON + safetensors serializable)."""
    py = random.getstate()
    # Legacy MT19937 state tuple (numpy's stubs type the default-argument call as a dict).
    np_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
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
    """Restore what ``rng_state`` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# -------------------------------------------------------------------------------------- atomic writes
def atomic_write_bytes(data: bytes, path: Path, keep_previous: Path | None = None, fault: str | None = None) -> None:
    """``mola.files.write_bytes`` (temp file + fsync + rename, ``keep_previous`` kept first) with this write's
    fault-injection points ``<fault>.tmp_written``, ``<fault>.prev_kept`` and ``<fault>.written``."""
    write_bytes(data, path, keep_previous=keep_previous,
                on_step=(lambda step: fault_point(f"{fault}.{step}")) if fault else None)


def remove_stale_temp_files(run_or_dir: str | Path) -> list[Path]:
    """Delete temp files a killed writer left in a run's checkpoint folder; returns what was removed."""
    folder = Path(run_or_dir)
    folder = folder if folder.name == "checkpoints" else folder / "checkpoints"
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# ------------------------------------------------------------------------------------- (de)serializing
_MARKERS = ("__tensor__", "__tuple__", "__dict__")


def _flatten(obj: Any, where: str, tensors: dict[str, torch.Tensor], seen: set[int]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = where or "tensor"
        n = 1
        while key in tensors:
            key, n = f"{where}#{n}", n + 1
        t = obj.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone()  # safetensors refuses tensors that share (or only partly use) a storage
        seen.add(t.untyped_storage().data_ptr())
        tensors[key] = t
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(m in obj for m in _MARKERS):
            return {k: _flatten(v, f"{where}/{k}" if where else k, tensors, seen) for k, v in obj.items()}
        return {"__dict__": [[_flatten(k, f"{where}/key", tensors, seen),
                              _flatten(v, f"{where}/{k}" if where else str(k), tensors, seen)]
                             for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, f"{where}/{i}", tensors, seen) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{where}/{i}", tensors, seen) for i, v in enumerate(obj)]
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state {where!r}: cannot store a {type(obj).__name__} (tensors and plain values only)")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


_digest = tensors_sha256  # the checksum stored in (and verified against) a checkpoint's metadata


def checkpoint_bytes(state: dict[str, Any]) -> bytes:
    """Serialize a training state (nested dicts/lists of tensors and plain values) to safetensors bytes."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_flatten(state, "", tensors, set()))
    meta = {"format": FORMAT, "version": VERSION, "state": skeleton, "sha256": _digest(skeleton, tensors)}
    return st_save(tensors, meta)


def _header(data: bytes, path: Path) -> dict[str, Any]:
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes, shorter than the 8-byte safetensors header length")
    n = int.from_bytes(data[:8], "little")
    if 8 + n > len(data):
        raise ValueError(f"header of {n} bytes but only {len(data) - 8} bytes follow")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"unreadable header ({err})") from err
    except RecursionError:
        raise ValueError("header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header


def _corrupt(path: Path, reason: str) -> ValueError:
    return ValueError(f"checkpoint {path} is corrupt or truncated: {reason}")


def _load_legacy(path: Path, data: bytes) -> dict[str, Any]:
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for truncated/corrupt files
        if "Weights only load failed" in str(err):
            raise ValueError(f"checkpoint {path} holds pickled objects other than tensors and plain values; "
                             "refused (checkpoints are never unpickled with code execution)") from err
        raise _corrupt(path, str(err)) from err
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{path} is not a mola checkpoint")
    return obj


_TYPES: dict[str, tuple[type, ...]] = {"epoch": (int,), "best_epoch": (int,), "step": (int,), "config": (dict,),
                                       "model": (dict,), "best_score": (int, float), "history": (list,)}


def _check_types(state: dict[str, Any], path: Path) -> None:
    """Top-level fields of the wrong type (a crafted or foreign file) are a ValueError naming field and type."""
    for key, types in _TYPES.items():
        if key not in state:
            continue
        v = state[key]
        if isinstance(v, bool) or not isinstance(v, types):
            raise ValueError(f"checkpoint {path} is malformed: {key!r} is a {type(v).__name__}, expected "
                             f"{' or '.join(t.__name__ for t in types)}")
    bad = [k for k, v in state["model"].items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint {path} is malformed: model entry {bad[0]!r} is not a tensor")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint without executing any pickled code and verify it; corrupt/truncated -> ValueError.

    Returns the training state: at least "model" (state dict), "config", "epoch" and "best_epoch"; "path"
    is set to the file read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (is {path.parent.parent} a mola run directory?)")
    data = path.read_bytes()
    if path.suffix == LEGACY_SUFFIX and data[:4] == b"PK\x03\x04":
        state = _load_legacy(path, data)
    else:
        try:
            header = _header(data, path)
        except ValueError as err:
            raise _corrupt(path, str(err)) from err
        meta = header.get("__metadata__")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a mola checkpoint (no mola metadata in its safetensors header)")
        try:
            tensors = st_load(data)
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for bad buffers
            raise _corrupt(path, str(err)) from err
        skeleton = meta.get("state", "")
        if _digest(skeleton, tensors) != meta.get("sha256"):
            raise _corrupt(path, "sha256 of its content does not match the one recorded when it was written")
        try:
            state = _unflatten(json.loads(skeleton), tensors)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise _corrupt(path, f"bad state record ({err})") from err
        except RecursionError:
            raise _corrupt(path, "its state record is nested too deeply") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a mola checkpoint (its state is a {type(state).__name__}, not a mapping)")
    missing = [k for k in ("model", "config", "epoch", "best_epoch") if k not in state]
    if missing:
        raise ValueError(f"{path} is not a complete mola checkpoint (missing {', '.join(missing)})")
    _check_types(state, path)
    state["path"] = str(path)
    return state


def save_checkpoint(state: dict[str, Any], run_dir: str | Path, which: str | tuple[str, ...] = "last") -> list[Path]:
    """Write ``state`` as checkpoint(s) ``which`` ("last", "best" or both) of ``run_dir``, atomically.

    The ``last`` it replaces is kept as ``last.prev``. ``best`` is always written before ``last``: a kill
    between the two leaves the old ``last``, so the resumed run redoes that epoch and rewrites ``best`` (the
    other order would leave a ``last`` whose ``best_epoch`` names weights that ``best`` does not hold).
    Returns the paths written."""
    names = (which,) if isinstance(which, str) else tuple(which)
    names = tuple(sorted(names, key=lambda n: n != "best"))
    data = checkpoint_bytes(state)
    out = []
    for name in names:
        path = _path(Path(run_dir), name)
        atomic_write_bytes(data, path, keep_previous=_path(Path(run_dir), PREVIOUS) if name == "last" else None,
                           fault=name)
        out.append(path)
    return out


# ---------------------------------------------------------------------------------------------- paths
def _path(run_dir: Path, name: str) -> Path:
    return run_dir / "checkpoints" / f"{name}{SUFFIX}"


def checkpoint_path(run_or_path: str | os.PathLike[str], which: str = "best") -> Path:
    """The checkpoint file of a run directory (``which`` = best/last), or ``run_or_path`` itself if it is a file.

    The one place that knows checkpoint file names: callers never build ``checkpoints/...`` paths themselves.
    Runs written before the safetensors format have ``.pt`` files; those are returned when no new one exists."""
    path = Path(run_or_path)
    if path.is_file():
        return path
    if which not in CHECKPOINT_NAMES:
        raise ValueError(f"checkpoint must be one of {', '.join(CHECKPOINT_NAMES)}, got {which!r}")
    new = _path(path, which)
    legacy = new.with_suffix(LEGACY_SUFFIX)
    return legacy if not new.exists() and legacy.exists() else new


def has_checkpoint(run_dir: str | Path) -> bool:
    """True if ``run_dir`` holds a ``last`` checkpoint (or the ``last.prev`` kept next to it)."""
    run_dir = Path(run_dir)
    return checkpoint_path(run_dir, "last").is_file() or _path(run_dir, PREVIOUS).is_file()


def load_latest(run_dir: str | Path) -> dict[str, Any]:
    """The newest loadable ``last`` checkpoint of ``run_dir``: ``last``, else (with a warning) ``last.prev``.

    Raises FileNotFoundError when there is none, ValueError (naming both files) when neither is loadable."""
    run_dir = Path(run_dir)
    last, prev = checkpoint_path(run_dir, "last"), _path(run_dir, PREVIOUS)
    if not last.is_file() and not prev.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from in {run_dir / 'checkpoints'}")
    problem = f"{last} is missing"
    if last.is_file():
        try:
            return load_checkpoint(last)
        except ValueError as err:
            problem = str(err)
    if not prev.is_file():
        raise ValueError(f"{problem}; and there is no previous checkpoint {prev} to fall back to")
    try:
        state = load_checkpoint(prev)
    except ValueError as err:
        raise ValueError(f"no loadable checkpoint in {run_dir / 'checkpoints'}: {problem}; {err}") from err
    warnings.warn(f"{problem}; resuming from the previous good checkpoint {prev} instead", RuntimeWarning,
                  stacklevel=2)
    return state


def read_checkpoint_info(path: str | Path) -> dict[str, Any]:
    """The plain (non-tensor) fields of a checkpoint's top level (epoch, step, position, ...), read from its
    header only: cheap, for monitoring a run. Does not verify the payload (use ``load_checkpoint`` for that)."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        data = head + fh.read(n)
    try:
        meta = _header(data, path).get("__metadata__") or {}
        skeleton = json.loads(meta["state"])
    except (ValueError, KeyError, TypeError) as err:
        raise _corrupt(path, str(err)) from err
    return {k: v for k, v in skeleton.items() if not isinstance(v, (dict, list))}
