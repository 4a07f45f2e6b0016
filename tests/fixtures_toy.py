"""Toy in-memory scenarios, tiny configs and the bad-input matrix runner shared by the tests (``conftest.py``
serves ``toy_scenario`` as a fixture too)."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mola.data import ArrayTaskDataset, Scenario, TaskInfo
from mola.engine import RunConfig, Trainer, load_config

FEATURES = 6

#: (name, case function, error type, message pattern): a case function takes any of tmp_path, capsys,
#: monkeypatch and the module's fixtures by name, and must raise the error
Case = tuple[str, Callable[..., None], type[BaseException], str]


def toy_scenario(n: tuple[int, int, int] | int = (16, 8, 8), *, task_ids: Any = None, labels: Any = None,
                 num_classes: int = 3, kind: str = "multi_input", train_tf: Any = None, val_tf: Any = None,
                 num_tasks: int = 2, features: int = FEATURES) -> Scenario:
    """``num_tasks`` tasks (ids alternate), ``features``-d Gaussian inputs (seed 0), labels ``i % num_classes``;
    ``n``: split sizes (an int: the train size, val and test 8); ``task_ids``/``labels`` replace the train
    split's, ``train_tf``/``val_tf`` are per-sample input transforms of those splits."""
    sizes = (n, 8, 8) if isinstance(n, int) else n
    g = torch.Generator().manual_seed(0)

    def ds(k: int, tid: Any = None, lab: Any = None, tf: Any = None) -> ArrayTaskDataset:
        t = np.arange(k) % num_tasks if tid is None else tid
        y = torch.arange(k) % num_classes if lab is None else lab
        return ArrayTaskDataset(torch.randn(k, features, generator=g), torch.as_tensor(y), t, tf)

    tasks = [TaskInfo(f"t{i}", num_classes=num_classes) for i in range(num_tasks)]
    return Scenario("toy", kind, tasks, ds(sizes[0], task_ids, labels, train_tf), ds(sizes[1], tf=val_tf),
                    ds(sizes[2]), (features,), shared_head=kind == "domain")


def tiny_cfg(*over: str) -> RunConfig:
    """A 1-epoch CPU config with a width-1 MLP backbone, batch 4; ``over``: dotted overrides."""
    return load_config(None, ["model.backbone.name=mlp", "model.backbone.width=1", "data.batch_size=4",
                              "train.epochs=1", "train.progress=false", "train.tensorboard=false",
                              "train.device=cpu", "optim.lr=0.01", *over])


def train_toy(tmp_path: Path, sc: Scenario, *over: str) -> Trainer:
    """Fit ``tiny_cfg(*over)`` on ``sc`` into ``tmp_path/r``; the trainer after the run."""
    t = Trainer(tiny_cfg(*over), tmp_path / "r", scenario=sc)
    t.fit()
    return t


class NaNAfter:
    """A transform that returns NaN inputs for calls ``start < call <= stop`` (a batch going bad mid-run)."""

    def __init__(self, start: int, stop: int = 10**9) -> None:
        self.calls, self.start, self.stop = 0, start, stop

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.full_like(x, math.nan) if self.start < self.calls <= self.stop else x


def run_case(case: Case, request: pytest.FixtureRequest, tmp_path: Path, quiet: bool = False) -> None:
    """Call the case function with the fixtures it names; assert it raises its error type with a message
    matching its pattern (``quiet``: warnings ignored)."""
    _, fn, err_type, pattern = case
    required = fn.__code__.co_argcount - len(fn.__defaults__ or ())  # arguments with defaults keep them
    wanted = fn.__code__.co_varnames[:required]
    kwargs = {name: tmp_path if name == "tmp_path" else request.getfixturevalue(name) for name in wanted}
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        with pytest.raises(err_type) as info:
            fn(**kwargs)
    assert re.search(pattern, str(info.value), re.S), f"{info.value!s}\n  does not match\n{pattern}"
