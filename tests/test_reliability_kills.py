"""Kills at every named instant of a run's writes (``MOLA_FAULT``), then ``--resume``: the resumed run ends
bit-identical to an uninterrupted one (final and best weights, best epoch, metrics). Also the run-folder lock and
the refusal to overwrite results without a checkpoint."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixtures_data import make_npz
from mola.cli.main import main
from mola.engine.checkpoint import (
    FAULT_ENV,
    FAULT_POINTS,
    LOCK_NAME,
    RunLock,
    RunLockedError,
    checkpoint_path,
    load_checkpoint,
)

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked process (POSIX only)")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny 2-task MedMNIST-layout scenario, its config, and one uninterrupted reference run."""
    root = tmp_path_factory.mktemp("kills")
    make_npz(root / "med" / "bloodmnist.npz", (24, 8, 8), 3)
    make_npz(root / "med" / "pathmnist.npz", (24, 8, 8), 3, seed=1)
    config = root / "c.yaml"
    config.write_text(
        f"name: k\ndata: {{kind: medmnist, root: {root / 'med'}, batch_size: 8}}\n"
        "model: {backbone: {name: mlp, width: 1}, mola: {mode: router}}\n"
        "train: {epochs: 3, progress: false, tensorboard: false, device: cpu, weighting: rlw}\noptim: {lr: 0.02}\n")
    assert main(["train", "--config", str(config), "--out", str(root / "ref")]) == 0
    return config, root / "ref"


def train_killed_at(point: str, config: Path, out: Path, *extra: str) -> None:
    """``mola train`` in a forked child that SIGKILLs itself at ``point``; asserts it died there."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        code = 99
        try:
            os.environ[FAULT_ENV] = point
            code = 98 + main(["train", "--config", str(config), "--out", str(out), *extra])
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"not killed at {point}: {status}"


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as fh:
        out = list(csv.DictReader(fh))
    for r in out:
        del r["seconds"]
    return out


def assert_same_run(ref: Path, run: Path) -> None:
    for which in ("best", "last"):
        a, b = load_checkpoint(checkpoint_path(ref, which)), load_checkpoint(checkpoint_path(run, which))
        assert (a["epoch"], a["best_epoch"]) == (b["epoch"], b["best_epoch"]), which
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (which, k)
    fa, fb = json.loads((ref / "final.json").read_text()), json.loads((run / "final.json").read_text())
    assert fa["best_epoch"] == fb["best_epoch"] and fa["test"] == fb["test"] and fa["val"] == fb["val"]
    assert rows(ref) == rows(run)


# 2nd pass of each point = epoch 1's writes (the first `last` has no predecessor, so last.prev_kept starts there)
@pytest.mark.parametrize("point", [f"{p}:2" if p != "final.written" else p for p in FAULT_POINTS])
def test_kill_at_each_write_point_then_resume_is_bit_identical(setup: tuple[Path, Path], tmp_path: Path,
                                                              point: str) -> None:
    config, ref = setup
    best_writes = sum(1 for _ in (ref / "checkpoints").glob("best*"))
    assert best_writes and json.loads((ref / "final.json").read_text())["best_epoch"] >= 1  # best moves on
    run = tmp_path / "run"
    train_killed_at(point, config, run)
    assert (run / LOCK_NAME).exists()  # the dead process's lock is left behind: a stale lock
    with pytest.warns(RuntimeWarning, match=r"removing the stale lock of process \d+"):
        assert main(["train", "--config", str(config), "--out", str(run), "--resume"]) == 0
    assert_same_run(ref, run)
    assert not (run / LOCK_NAME).exists()


@pytest.mark.slow
def test_real_process_killed_between_best_and_last_writes(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """The issue's case, in a fresh interpreter: killed after the 2nd `best` is written, before its `last`."""
    config, ref = setup
    run = tmp_path / "run"
    env = {**os.environ, FAULT_ENV: "best.written:2", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "mola.cli.main", "train", "--config", str(config), "--out", str(run)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    best = load_checkpoint(checkpoint_path(run, "best"))  # the new best is on disk ...
    assert best["best_epoch"] == json.loads((ref / "final.json").read_text())["best_epoch"] >= 1
    assert load_checkpoint(checkpoint_path(run, "last"))["epoch"] == best["epoch"] - 1  # ... `last` is not
    with pytest.warns(RuntimeWarning, match="stale lock"):
        assert main(["train", "--config", str(config), "--out", str(run), "--resume"]) == 0
    assert_same_run(ref, run)


def test_run_folder_lock_names_the_other_process(tmp_path: Path, setup: tuple[Path, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config, _ = setup
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / LOCK_NAME).write_text(f"{sleeper.pid} {os.uname().nodename}\n")
        assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert f"run folder {tmp_path / 'run'} is in use by process {sleeper.pid}" in err
        assert not (tmp_path / "run" / "config.yaml").exists()
        with pytest.raises(RunLockedError, match=f"in use by process {sleeper.pid}"):
            RunLock(tmp_path / "run").acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.warns(RuntimeWarning, match=f"stale lock of process {sleeper.pid}"):
        with RunLock(tmp_path / "run"):
            assert (tmp_path / "run" / LOCK_NAME).read_text().split()[0] == str(os.getpid())
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def _results_without_checkpoint(tmp_path: Path, ref: Path) -> Path:
    """A run folder holding a finished run's config.yaml, metrics.csv and final.json but no checkpoint."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "metrics.csv", "final.json"):
        (run / name).write_text((ref / name).read_text())
    return run


def test_results_without_checkpoint_are_not_overwritten(tmp_path: Path, setup: tuple[Path, Path],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    config, ref = setup
    run = _results_without_checkpoint(tmp_path, ref)
    for extra in ([], ["--resume"]):
        assert main(["train", "--config", str(config), "--out", str(run), *extra]) == 2
        assert "holds config.yaml, metrics.csv, final.json but no checkpoint to resume from; pass --overwrite" \
            in capsys.readouterr().err
    assert (run / "final.json").read_text() == (ref / "final.json").read_text()
    assert main(["train", "--config", str(config), "--out", str(run), "--overwrite", "train.epochs=1"]) == 0
    assert json.loads((run / "final.json").read_text())["epochs"] == 1


def lrs_and_steps(run: Path) -> tuple[list[float], list[int]]:
    with open(run / "metrics.csv") as fh:
        got = list(csv.DictReader(fh))
    return [float(r["lr"]) for r in got], [int(r["step"]) for r in got]


def test_resume_with_more_epochs_replans_cosine_monotone(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """Killed after epoch 1 of 2 (cosine, lr 0.02), resumed with train.epochs=4: the notice states the new end
    and the logged lr falls from where it was to 0 at epoch 4, as a cosine of the new length scaled from there."""
    config, _ = setup
    run = tmp_path / "run"
    train_killed_at("metrics.written:1", config, run, "train.epochs=2")
    with pytest.warns(RuntimeWarning, match=r"train.epochs 2 -> 4: the cosine schedule is re-planned to end at "
                                            r"epoch 4 \(step \d+\)"):
        assert main(["train", "--config", str(config), "--out", str(run), "--resume", "train.epochs=4"]) == 0
    lrs, steps = lrs_and_steps(run)
    spe = steps[0]
    assert len(lrs) == 4 and steps == [spe * (e + 1) for e in range(4)]
    assert lrs[0] == pytest.approx(0.02 * (1 + math.cos(math.pi / 2)) / 2)  # epoch 1 of the 2-epoch plan
    total = 4 * spe
    expected = [lrs[0] * (1 + math.cos(math.pi * s / total)) / (1 + math.cos(math.pi * spe / total)) for s in steps]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False)) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert json.loads((run / "final.json").read_text())["epochs"] == 4


@pytest.mark.parametrize("scheduler", ["cosine", "step", "none"])
def test_resume_with_fewer_epochs_is_refused_and_writes_nothing(setup: tuple[Path, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str],
                                                                scheduler: str) -> None:
    config, _ = setup
    run = tmp_path / "run"
    sched = [f"optim.scheduler={scheduler}"]
    assert main(["train", "--config", str(config), "--out", str(run), "train.epochs=2", *sched]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["train", "--config", str(config), "--out", str(run), "--resume", "train.epochs=1", *sched]) == 2
    assert "has trained 2 epoch(s); resuming with train.epochs=1" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    if scheduler == "cosine":  # a finished cosine schedule (lr 0) cannot be extended either
        assert main(["train", "--config", str(config), "--out", str(run), "--resume", "train.epochs=4"]) == 2
        assert "finished its cosine schedule" in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
        return
    with pytest.warns(RuntimeWarning, match=rf"train.epochs 2 -> 4: the run now ends at epoch 4 \({scheduler}"
                                            if scheduler == "step" else r"train.epochs 2 -> 4: the run now ends at "
                                                                        r"epoch 4 \(no lr schedule"):
        assert main(["train", "--config", str(config), "--out", str(run), "--resume", "train.epochs=4", *sched]) == 0
    lrs, _ = lrs_and_steps(run)
    assert len(lrs) == 4 and json.loads((run / "final.json").read_text())["epochs"] == 4
    if scheduler == "none":
        assert lrs == [0.02] * 4


def test_overwrite_removes_everything_the_old_run_wrote(tmp_path: Path, setup: tuple[Path, Path],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    config, ref = setup
    run = _results_without_checkpoint(tmp_path, ref)
    (run / "task_centroids.json").write_text("{}")
    for folder in ("analysis", "tb", "report", "conflict"):
        (run / folder).mkdir()
        (run / folder / "old.txt").write_text("stale")
    (run / "notes.txt").write_text("mine")
    assert main(["train", "--config", str(config), "--out", str(run), "--overwrite", "train.epochs=1",
                 "train.tensorboard=false"]) == 0
    err = capsys.readouterr().err
    assert "--overwrite: removed the old run's config.yaml, metrics.csv, final.json, task_centroids.json, tb/, " \
           "analysis/, report/" in err and "conflict/" in err and "left alone (not written by mola): notes.txt" in err
    assert not any((run / n).exists() for n in ("analysis", "tb", "report", "conflict"))
    assert (run / "notes.txt").read_text() == "mine"
    assert json.loads((run / "final.json").read_text())["epochs"] == 1
    assert json.loads((run / "task_centroids.json").read_text()) != {}  # the new run's (a router run writes it)
