"""Host syncs of one training step, counted on CPU (docs/performance.md), and what the step logs.

Every call that makes the host wait for a device result (``Tensor.item``, ``bool``, ``int``, ``float``, ``tolist``,
``numpy``, and the ops that size their output from tensor values: ``bincount``, ``unique``, ``nonzero``,
``repeat_interleave``, boolean indexing) is counted while the Trainer trains. A step costs 1 on an accelerator (the
finite-loss check), plus 1 for a gradient method (its Gram matrix). The task groups are computed on the host before
the batch moves to the device (``host_*`` functions, counted apart); the task-id range check is a sync on CPU only
(on an accelerator it is an asynchronous assert), so it is counted apart too; data loading is not counted.
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

SYNC_METHODS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")
# ops that size their output from tensor values: on an accelerator they wait for the device internally, so
# patching Python-level tensor methods alone cannot see them
SIZING_OPS = ("bincount", "unique", "nonzero", "repeat_interleave")
# functions named host_* work on host (CPU) tensors only, e.g. the trainer's batch preparation before to_device;
# their reads are counted apart (on a GPU, test_forward_and_losses_never_sync_on_cuda checks the device side)


def _sizes_from_values(name: str, args: tuple, kwargs: dict) -> bool:
    """repeat_interleave syncs only for tensor repeats without ``output_size``; the other sizing ops always do."""
    if name != "repeat_interleave":
        return True
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
    return isinstance(repeats, torch.Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None


@contextmanager
def count_syncs(sites: list[str]) -> Iterator[None]:
    """Append the calling site (file:function) of every host-syncing tensor call made inside the block: the
    Python-level reads (``item``, ``bool``, ...) and the ops whose output size depends on tensor values
    (``bincount``, ``unique``, ``nonzero``, ``repeat_interleave`` with tensor repeats) or boolean-mask indexing.
    Sites inside ``host_*`` functions (CPU tensors only, e.g. the batch before ``to_device``) end in "(host)";
    the task-id range check (a sync on CPU only) ends in "(cpu-only)"."""
    saved = [(torch.Tensor, name, getattr(torch.Tensor, name)) for name in (*SYNC_METHODS, *SIZING_OPS)]
    saved += [(torch, name, getattr(torch, name)) for name in SIZING_OPS]
    saved.append((torch.Tensor, "__getitem__", torch.Tensor.__getitem__))

    def record() -> None:
        frames = traceback.extract_stack()[:-2]
        if any("torch/utils/data" in f.filename for f in frames):
            return  # the data loader runs on the host
        caller = next(f for f in reversed(frames) if "/torch/" not in f.filename or "/mola/" in f.filename)
        inner = [f.name for f in frames if "/mola/" in f.filename]
        host = any(n.startswith("host_") for n in inner)
        tag = " (host)" if host else " (cpu-only)" if "check_task_ids" in inner else ""
        sites.append(f"{Path(caller.filename).name}:{caller.name}{tag}")

    def wrap(name, fn):  # noqa: ANN001, ANN202
        def inner(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if name == "__getitem__":
                index = args[1] if len(args) > 1 else None
                parts = index if isinstance(index, tuple) else (index,)
                if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                    record()
            elif name not in SIZING_OPS or _sizes_from_values(name, args, kwargs):
                record()
            return fn(*args, **kwargs)
        return inner

    for owner, name, fn in saved:
        setattr(owner, name, wrap(name, fn))
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def on_device(sites: list[str]) -> list[str]:
    """The sites that are host syncs on an accelerator (not the CPU-only range check, not host-side prep)."""
    return [s for s in sites if not s.endswith(("(cpu-only)", "(host)"))]


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


# (method, arch, weighting) -> host syncs per step on an accelerator: the finite-loss check, plus the Gram
# matrix a gradient method solves on the host (docs/performance.md)
STEP_SYNCS = [
    ("mola_grad", None, "ew", 1), ("mola_router", None, "ew", 1), (None, "hps", "ew", 1),
    ("mola_grad", None, "rlw", 1), ("mola_grad", None, "dwa", 1), ("mola_grad", None, "gradnorm", 1),
    (None, "hps", "pcgrad", 2), (None, "hps", "gradvac", 2),
]


@pytest.mark.parametrize(("method", "arch", "weighting", "budget"), STEP_SYNCS)
def test_a_training_step_has_one_host_sync(tmp_path: Path, method: str | None, arch: str | None,
                                           weighting: str, budget: int) -> None:
    sites = syncs_per_step(tmp_path, method, arch, weighting)
    print(f"\n{method or arch}+{weighting}: {len(on_device(sites))} syncs per step on an accelerator: {sites}")
    assert len(on_device(sites)) <= budget, sites
    assert not [s for s in on_device(sites) if "routing.py" in s or "base.py:task" in s], sites  # no sizing op
    assert sum(s.endswith("(cpu-only)") for s in sites) <= 1, sites  # the task-id range check, once per step


def test_the_counter_sees_a_device_side_bincount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The counter is not blind to syncs inside C++ ops: when the trainer stops handing the model the task groups
    it computed on the host, the model's own ``torch.bincount`` on the (device) task ids is counted."""
    from mola.models.base import MultiTaskModel

    monkeypatch.setattr(MultiTaskModel, "use_task_groups", lambda self, task_ids, groups: None)
    sites = on_device(syncs_per_step(tmp_path, "mola_grad", None, "ew"))
    assert any(s.startswith("routing.py:task_groups") for s in sites), sites


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["mola_grad", "mola_router"])
def test_forward_and_losses_never_sync_on_cuda(tmp_path: Path, method: str) -> None:
    """On a GPU, the forward and the per-task losses of a batch prepared by ``host_batch`` run under
    ``torch.cuda.set_sync_debug_mode("error")``: any host sync in them (bincount, nonzero, .item(), ...) raises."""
    from mola.engine.evaluate import forward_losses, host_batch

    cfg = load_config(None, ["model.backbone.name=small_cnn", "model.backbone.width=4", "data.batch_size=12",
                             "train.progress=false", "train.tensorboard=false", "train.device=cuda"], method=method)
    trainer = Trainer(cfg, tmp_path / "run", scenario=scenario())
    batch = next(iter(trainer.loaders["train"]))
    x, y, t = host_batch(trainer.model, batch, trainer.device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, losses, _ = forward_losses(trainer.model, trainer.tasks, x, y, t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert set(losses) == {0, 1, 2}
