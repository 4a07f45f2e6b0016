"""DDP under torchrun: 2 CPU processes (gloo) give the same run as 1 process with the same global batch.

One module fixture launches torchrun twice (a driver that runs several ``mola train`` commands in the same
2 processes, then the plain ``python -m mola.cli.main train --resume`` CLI) and runs the 1-process references
in this process; the tests compare weights, losses, metrics and which rank wrote files.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler

from mola.cli.main import main
from mola.data.loaders import BalancedBatchSampler, EpochRandomSampler, set_loader_position
from mola.engine import Trainer, load_config
from mola.engine.checkpoint import checkpoint_path, load_checkpoint
from mola.engine.distributed import DistContext, ShardedBatchSampler, init_distributed, shard_batch

OFFICE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "office_caltech10"

# Office-Caltech10 SURF features, 4 domains; an MLP without BatchNorm (per-rank batch statistics would differ,
# docs/distributed.md) and without dropout; SGD so that float32 reduction-order noise stays ~1e-8.
BASE = [
    f"data.root={OFFICE}", "data.kind=office_caltech10", "data.batch_size=16", "data.eval_batch_size=32",
    "data.max_per_task=40", "data.max_eval_per_task=20", "model.backbone.name=mlp", "model.backbone.width=4",
    "model.backbone.options.norm=none", "model.backbone.options.dropout=0", "train.epochs=2",
    "train.max_steps_per_epoch=3", "train.progress=false", "train.tensorboard=false", "train.eval_test=true",
    "train.device=cpu", "optim.name=sgd", "optim.lr=0.05",
]
RUNS = {
    "grad": ["model.mola.mode=grad"],
    "router_balanced": ["model.mola.mode=router", "data.sampling=balanced"],
    "pcgrad": ["model.mola.mode=grad", "train.weighting=pcgrad"],
    "mgda_ub": ["model.mola.mode=router", "train.weighting=mgda_ub"],
}

DRIVER = r'''
import json, os, sys

root, runs = sys.argv[1], json.loads(sys.argv[2])
rank = int(os.environ["RANK"])
report = os.path.join(root, f"writes_rank{rank}.json")
writes = []
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (flags & WRITE_FLAGS) if isinstance(flags, int) else any(c in (mode or "") for c in "wax+")
        if writing and isinstance(path, (str, bytes, os.PathLike)):
            writes.append(os.fsdecode(path))
    elif event == "os.rename":
        writes.extend([os.fsdecode(args[0]), os.fsdecode(args[1])])
    elif event in ("os.remove", "os.mkdir", "os.rmdir"):
        writes.append(os.fsdecode(args[0]))


sys.addaudithook(hook)
from mola.cli.main import main  # noqa: E402

for name, args in runs:
    rc = main(["train", *args, "--out", os.path.join(root, name)])
    assert rc == 0, (name, rc)
mine = [w for w in writes if os.path.abspath(w).startswith(os.path.abspath(root)) and w != report]
with open(report, "w") as fh:
    json.dump(mine, fh)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(args: list[str], cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run directories: ddp_<name> (2 processes), ref_<name> (1 process), ddp_resume (1 epoch, then resumed)."""
    if not OFFICE.is_dir():
        pytest.fail(f"shipped Office-Caltech10 data not found at {OFFICE}")
    root = tmp_path_factory.mktemp("ddp")
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    plan = [[f"ddp_{n}", BASE + extra] for n, extra in RUNS.items()]
    plan.append(["ddp_resume", BASE + RUNS["grad"] + ["train.epochs=1"]])
    _torchrun([str(driver), str(root), json.dumps(plan)], root)
    _torchrun(["-m", "mola.cli.main", "train", *BASE, *RUNS["grad"], "--out", str(root / "ddp_resume"),
               "--resume"], root)
    for name, extra in RUNS.items():
        assert main(["train", *BASE, *extra, "--out", str(root / f"ref_{name}")]) == 0
    return root


def _last(run: Path) -> dict:
    return load_checkpoint(checkpoint_path(run, "last"))


def _max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_equal_one_process(runs: Path, name: str) -> None:
    ddp, ref = _last(runs / f"ddp_{name}"), _last(runs / f"ref_{name}")
    assert ddp["step"] == ref["step"] == 6
    initial = Trainer(load_config(None, BASE + RUNS[name]), runs / "unused").model.state_dict()
    assert _max_weight_diff(ref["model"], initial) > 1e-3  # the compared weights did train
    assert _max_weight_diff(ddp["model"], ref["model"]) < 1e-6
    assert ddp["best_epoch"] == ref["best_epoch"]
    for row_d, row_r in zip(ddp["history"], ref["history"], strict=True):
        losses = [k for k in row_r if k.startswith(("train/", "val/"))]
        assert losses and all(row_d[k] == pytest.approx(row_r[k], rel=1e-5, abs=1e-6) for k in losses)
    fin_d = json.loads((runs / f"ddp_{name}" / "final.json").read_text())
    fin_r = json.loads((runs / f"ref_{name}" / "final.json").read_text())
    for split in ("val", "test"):
        for task, res in fin_r[split].items():
            assert fin_d[split][task]["acc"] == pytest.approx(res["acc"], abs=1e-12)
            assert fin_d[split][task]["auc"] == pytest.approx(res["auc"], abs=1e-9)


def test_only_rank_zero_writes_files(runs: Path) -> None:
    rank0 = json.loads((runs / "writes_rank0.json").read_text())
    rank1 = json.loads((runs / "writes_rank1.json").read_text())
    assert rank1 == []
    written = {Path(p).name for p in rank0}
    assert {"config.yaml", "final.json", "metrics.csv"} <= written
    assert any("checkpoints" in p for p in rank0)
    for name in RUNS:
        assert (runs / f"ddp_{name}" / "final.json").is_file()


def test_resume_under_two_processes_continues_exactly(runs: Path) -> None:
    resumed, ref = _last(runs / "ddp_resume"), _last(runs / "ref_grad")
    assert [r["epoch"] for r in resumed["history"]] == [0, 1]
    assert resumed["step"] == ref["step"]
    assert _max_weight_diff(resumed["model"], ref["model"]) < 1e-6


# -- sharding, without processes -----------------------------------------------------------------------------
def test_shards_partition_the_global_batch_and_keep_tasks_balanced() -> None:
    task_ids = np.repeat(np.arange(4), [50, 30, 10, 7])
    balanced = BalancedBatchSampler(task_ids, batch_size=24, seed=3)
    mixed = BatchSampler(EpochRandomSampler(len(task_ids), seed=3), 24, drop_last=True)
    for inner in (balanced, mixed):
        glob = list(inner)
        for epoch_world in (2, 3):
            shards = []
            for rank in range(epoch_world):
                s = ShardedBatchSampler(inner, task_ids, rank, epoch_world)
                s.set_epoch(0)
                shards.append(list(s))
            for b, batch in enumerate(glob):
                parts = [sh[b] for sh in shards]
                assert sorted(sum(parts, [])) == sorted(batch)
                for t in range(4):
                    per_rank = [sum(task_ids[i] == t for i in p) for p in parts]
                    assert max(per_rank) - min(per_rank) <= 1
        if inner is balanced:  # balanced: each batch holds every task about equally, so each rank does too
            counts = Counter(task_ids[i] for i in shards[0][0])
            assert len(counts) == 4 and max(counts.values()) - min(counts.values()) <= 1
    with pytest.raises(ValueError, match="cannot be split over 4 processes"):
        shard_batch([1, 2, 3], task_ids, 0, 4)


def test_sharded_loader_resumes_mid_epoch() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    task_ids = np.repeat(np.arange(3), 20)
    ds = TensorDataset(torch.arange(60))
    ds.task_ids = task_ids
    inner = BalancedBatchSampler(task_ids, batch_size=12, seed=1)
    loader = DataLoader(ds, batch_sampler=ShardedBatchSampler(inner, task_ids, 1, 2))
    set_loader_position(loader, 2, 0)
    full = [b[0].tolist() for b in loader]
    set_loader_position(loader, 2, 3)
    tail = [b[0].tolist() for b in loader]
    assert len(full) == 5 and tail == full[3:]
    set_loader_position(loader, 1, 0)
    assert [b[0].tolist() for b in loader] != full


def test_one_process_context_is_a_no_op() -> None:
    ctx = init_distributed(torch.device("cpu"))
    assert isinstance(ctx, DistContext) and not ctx.enabled and ctx.is_main and ctx.world_size == 1
    x = torch.randn(3, 2, requires_grad=True)
    assert ctx.gather_rows(x) is x and ctx.all_reduce_sum(x) is x and ctx.row_counts(3) == [3]
    losses = {0: x.sum()}
    assert ctx.global_losses(losses, {0: torch.zeros(3)}, []) is losses


def test_loss_counts_are_the_loss_denominators() -> None:
    """global_losses rebuilds global means from local means times these counts: check them per task kind."""
    from mola.data.base import TaskInfo
    from mola.engine.losses import task_loss, task_loss_count

    g = torch.Generator().manual_seed(0)
    seg = TaskInfo("s", kind="segmentation", num_classes=3)
    tgt = torch.tensor([[[0, -1], [2, -1]]])
    logits = torch.randn(1, 3, 2, 2, generator=g)
    per_pixel = torch.nn.functional.cross_entropy(logits, tgt, ignore_index=-1, reduction="sum")
    assert int(task_loss_count(seg, tgt)) == 2
    assert float(task_loss(seg, logits, tgt)) * 2 == pytest.approx(float(per_pixel), rel=1e-6)
    depth = TaskInfo("d", kind="depth")
    d_t = torch.tensor([[[[0.0, 1.0], [2.0, 0.0]]]])
    assert int(task_loss_count(depth, d_t)) == 2
    normal = TaskInfo("n", kind="normal")
    n_t = torch.zeros(2, 3, 1, 2)
    n_t[0, 1, 0, 0] = 1.0
    assert int(task_loss_count(normal, n_t)) == 1
    cls = TaskInfo("c", num_classes=4)
    assert int(task_loss_count(cls, torch.tensor([1, 2, 3]))) == 3


def test_mlp_backbone_without_batchnorm() -> None:
    from mola.models.backbones import MLP

    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in MLP(8, [4, 4], norm="none").modules())
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in MLP(8, [4, 4]).modules())
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        MLP(8, [4], norm="layer")
