"""``mola sweep``: Ctrl-C stops queued runs, ends the runs in flight cleanly and writes the summary (exit 130);
dotted overrides on the command line apply to every run."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures_data import make_task_folders
from mola.cli.sweep import load_sweep, plan_sweep

SRC = Path(__file__).resolve().parents[1] / "src"


def _sweep(tmp_path: Path, epochs: int) -> Path:
    root = make_task_folders(tmp_path / "data", n=4)
    (tmp_path / "base.yaml").write_text(
        f"name: base\ndata: {{kind: tasks, root: {root}, image_size: 8, batch_size: 4}}\n"
        "model: {backbone: {name: small_cnn, width: 4}}\n"
        f"train: {{epochs: {epochs}, progress: false, tensorboard: false, device: cpu}}\n")
    p = tmp_path / "sweep.yaml"
    p.write_text(f"base: base.yaml\nout_dir: {tmp_path / 'out'}\ngrid: {{seed: [0, 1, 2, 3, 4, 5]}}\n")
    return p


def test_sigint_stops_a_two_worker_sweep_with_a_summary(tmp_path: Path) -> None:
    p = _sweep(tmp_path, epochs=500)
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mola.cli.main", "sweep", "--config", str(p), "--workers", "2",
                             "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "out"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all((out / f"s{i}" / "metrics.csv").exists() for i in (0, 1)):
        time.sleep(0.5)  # both runs in flight have finished an epoch
    assert proc.poll() is None, proc.communicate()
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == 130, stderr
    assert "interrupted (Ctrl-C)" in stderr and "run the same `mola sweep` command again" in stderr
    assert "2 interrupted" in stdout and "4 not started" in stdout
    with open(out / "sweep_summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["interrupted"] * 2 + ["not started"] * 4
    for i in (0, 1):  # each run in flight ended with its own clean exit: its checkpoint stays, resumable
        assert (out / f"s{i}" / "checkpoints").is_dir()
        assert "mola: interrupted (Ctrl-C)" in (out / f"s{i}" / "train.log").read_text()
    assert not (out / "s2").exists()
    assert [r.status for r in plan_sweep(load_sweep(p))][:3] == ["resume", "resume", "new"]


def test_sweep_takes_overrides_for_every_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mola.cli.main import main

    p = _sweep(tmp_path, epochs=500)
    spec = load_sweep(p)
    spec.common = ["train.epochs=1", "data.max_per_task=4"]
    assert all(r.overrides[:2] == spec.common for r in plan_sweep(spec))
    assert main(["sweep", "--config", str(p), "--no-progress", "train.epochs=1", "data.max_per_task=4",
                 "grid.seed=[0]"]) == 0  # a key of the sweep file: only seed 0 runs
    assert not (tmp_path / "out" / "s1").exists()
    import json

    final = json.loads((tmp_path / "out" / "s0" / "final.json").read_text())
    assert final["epochs"] == 1 and final["scenario"]["train"] == [4, 4, 4]


def test_ctrl_c_in_an_in_process_sweep_writes_the_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import mola.cli.sweep as sweep_mod
    from mola.cli.main import main

    p = _sweep(tmp_path, epochs=1)
    calls: list[str] = []

    def fake_train(run, spec):  # the second run is interrupted by Ctrl-C
        calls.append(run.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        (run.run_dir / "final.json").write_text('{"mean": {"val": {"acc": 0.5}, "test": {"acc": 0.5}}}')
        return {}

    monkeypatch.setattr(sweep_mod, "_train_in_process", fake_train)
    assert main(["sweep", "--config", str(p), "--no-progress"]) == 130
    captured = capsys.readouterr()
    assert "1 trained" in captured.out and "1 interrupted" in captured.out and "4 not started" in captured.out
    assert "run the same `mola sweep` command again" in captured.err
    with open(tmp_path / "out" / "sweep_summary.csv") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["trained", "interrupted"] + ["not started"] * 4
    assert calls == ["s0", "s1"]
