"""Host syncs of one training step, counted on CPU (docs/performance.md), and what the step logs.

Every call that makes the host wait for a device result (``Tensor.item``, ``bool``, ``int``, ``float``, ``tolist``,
``numpy``, ``nonzero``) is counted while the Trainer trains. A step of the default loop may cost at most 2 on an
accelerator: the per-task counts of the batch (they size every per-task slice) and the finite-loss check. The
task-id range check is a sync on CPU only (on an accelerator it is an asynchronous assert), so it is counted
apart; data loading runs on the host and is not counted.
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from mola.data.base import ArrayTaskDataset, Scenario, TaskInfo
from mola.engine import Trainer, load_config

SYNC_METHODS = ("item", "tolist", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")


@contextmanager
def count_syncs(sites: list[str]) -> Iterator[None]:
    """Append the calling site (file:function) of every host-syncing tensor call made inside the block."""
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}
    orig_nonzero = torch.nonzero

    def record() -> None:
        frames = traceback.extract_stack()[:-2]
        if any("torch/utils/data" in f.filename for f in frames):
            return  # the data loader runs on the host
        caller = next(f for f in reversed(frames) if "/torch/" not in f.filename or "/mola/" in f.filename)
        inner = [f.name for f in frames if "/mola/" in f.filename]
        sites.append(f"{Path(caller.filename).name}:{caller.name}" + (" (cpu-only)" if "check_task_ids" in inner
                                                                     else ""))

    def wrap(fn):  # noqa: ANN001, ANN202
        def inner(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            record()
            return fn(*args, **kwargs)
        return inner

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(fn))
    torch.nonzero = wrap(orig_nonzero)
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        torch.nonzero = orig_nonzero


def scenario() -> Scenario:
    g = torch.Generator().manual_seed(0)
    n = 48
    x = torch.randn(n, 1, 8, 8, generator=g)
    ids = torch.arange(n) % 3
    y = torch.randint(0, 2, (n,), generator=g)
    ds = ArrayTaskDataset(x, y, ids)
    return Scenario("syn", "multi_input", [TaskInfo(f"t{i}", num_classes=2) for i in range(3)], ds, ds, ds,
                    (1, 8, 8))


def syncs_per_step(tmp_path: Path, method: str | None, arch: str | None, weighting: str) -> list[str]:
    """Sites of the host syncs one training step adds (a 3-step epoch minus a 1-step epoch, halved)."""
    counts = []
    for steps in (1, 3):
        cfg = load_config(None, ["model.backbone.name=small_cnn", "model.backbone.width=4", "data.batch_size=12",
                                 "train.progress=false", "train.tensorboard=false", "train.device=cpu",
                                 f"train.max_steps_per_epoch={steps}", "train.log_every_steps=100"],
                          method=method, arch=arch, weighting=weighting)
        trainer = Trainer(cfg, tmp_path / f"{method}-{arch}-{weighting}-{steps}", scenario=scenario())
        trainer.train_epoch()  # warm-up (first-call work is not per step)
        sites: list[str] = []
        with count_syncs(sites):
            trainer.train_epoch()
        counts.append(sites)
    extra = Counter(counts[1]) - Counter(counts[0])
    assert all(n % 2 == 0 for n in extra.values()), extra  # the same syncs in each step
    return sorted(Counter({site: n // 2 for site, n in extra.items()}).elements())


@pytest.mark.parametrize(("method", "arch", "weighting"), [
    ("mola_grad", None, "ew"), ("mola_router", None, "ew"), (None, "hps", "ew"), ("mola_grad", None, "rlw"),
    ("mola_grad", None, "dwa"),
])
def test_a_training_step_has_at_most_two_host_syncs(tmp_path: Path, method: str | None, arch: str | None,
                                                      weighting: str) -> None:
    sites = syncs_per_step(tmp_path, method, arch, weighting)
    on_accelerator = [s for s in sites if not s.endswith("(cpu-only)")]
    assert len(on_accelerator) <= 2, sites
    assert len(sites) - len(on_accelerator) <= 1, sites  # the task-id range check, once per step


def test_the_counter_sees_a_per_task_item(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The counter is not blind: a loop that reads every task's loss with .item() adds T syncs per step."""
    import mola.engine.trainer as trainer_mod

    real = trainer_mod.RunningMeans.add

    def reading_add(self, values):  # noqa: ANN001, ANN202
        for v in values.values():
            if isinstance(v, torch.Tensor):
                v.item()
        return real(self, values)

    monkeypatch.setattr(trainer_mod.RunningMeans, "add", reading_add)
    sites = syncs_per_step(tmp_path, "mola_grad", None, "ew")
    assert sum(s.startswith("test_host_syncs.py") for s in sites) == 3, sites  # T = 3 tasks


def test_method_outputs_reach_metrics_csv(tmp_path: Path) -> None:
    """RLW's task weights (returned by its backward, kept on the device) are logged as epoch means in metrics.csv;
    reference: the same seeded draws, w = T softmax(z), z ~ N(0, I), averaged by hand."""
    import csv

    cfg = load_config(None, ["model.backbone.name=small_cnn", "model.backbone.width=4", "data.batch_size=12",
                             "train.progress=false", "train.tensorboard=false", "train.device=cpu", "train.epochs=1",
                             "train.max_steps_per_epoch=4", "train.log_every_steps=2", "train.eval_test=false",
                             "train.weighting_options.seed=3"], arch="hps", weighting="rlw")
    Trainer(cfg, tmp_path / "run", scenario=scenario()).fit()
    with open(tmp_path / "run" / "metrics.csv") as fh:
        row = next(csv.DictReader(fh))
    g = torch.Generator().manual_seed(3)
    draws = torch.stack([3 * torch.softmax(torch.randn(3, generator=g, dtype=torch.float64), 0) for _ in range(4)])
    for t in range(3):
        assert float(row[f"method/w{t}"]) == pytest.approx(float(draws[:, t].mean()), rel=1e-6)


def test_gradient_method_logs_conflicts_and_cosines() -> None:
    """PCGrad on two hand-made conflicting gradients: one conflicting pair; cosines against the applied direction
    computed by hand (PCGrad projects each gradient off the other: d = g1' + g2')."""
    from mola.methods import StepContext, get_weighting

    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    g1, g2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([-1.0, 1.0], dtype=torch.float64)
    losses = {0: (w * g1).sum(), 1: (w * g2).sum()}  # gradients g1, g2
    ctx = StepContext(model=torch.nn.Identity(), shared_params=[w], task_params=[], task_ids=torch.tensor([0, 1]),
                      num_tasks=2)
    logs = get_weighting("pcgrad", 2, seed=0).backward(losses, ctx)
    d = (g1 - (g1 @ g2) / (g2 @ g2) * g2) + (g2 - (g2 @ g1) / (g1 @ g1) * g1)
    torch.testing.assert_close(w.grad, d)
    assert float(logs["conflicts"]) == 1.0
    for t, g in enumerate((g1, g2)):
        assert float(logs[f"cos{t}"]) == pytest.approx(float(g @ d / (g.norm() * d.norm())), abs=1e-12)
