"""The mola command line: list, train, eval, and errors printed without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mola.cli.main import main

REPO = Path(__file__).resolve().parents[1]
MEDMNIST = REPO.parent / "shared" / "data" / "medmnist"


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("medmnist", "folder", "mola", "hps", "ew", "mola_grad", "mola_router", "resnet18", "small_cnn"):
        assert name in out, name


def test_train_eval_roundtrip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not MEDMNIST.is_dir():
        pytest.skip("shipped MedMNIST data not found")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"name: cli\ndata: {{kind: medmnist, root: {MEDMNIST}, tasks: [breastmnist, retinamnist], channels: 1,"
        " max_per_task: 128, max_eval_per_task: 64, batch_size: 64}\n"
        "model: {backbone: {name: small_cnn, width: 8}}\ntrain: {epochs: 1, progress: false}\n"
    )
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--method", "mola_router"]) == 0
    out = capsys.readouterr().out
    assert "breast" in out and "retina" in out and "mean" in out
    assert (run / "tb").is_dir() and any((run / "tb").iterdir())
    # a second train into the same directory without --resume is refused, with a message
    assert main(["train", "--config", str(cfg), "--out", str(run)]) == 2
    assert "--resume" in capsys.readouterr().err
    res = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run), "--output", str(res)]) == 0
    ev = json.loads(res.read_text())
    final = json.loads((run / "final.json").read_text())
    assert ev["test"]["breast"]["acc"] == pytest.approx(final["test"]["breast"]["acc"])


def test_errors_exit_2_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trian: {epochs: 1}\n")
    proc = subprocess.run([sys.executable, "-m", "mola.cli.main", "train", "--config", str(cfg)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown config key 'trian'" in proc.stderr and "'train'" in proc.stderr
    assert "Traceback" not in proc.stderr
    cfg.write_text("train: {epochs: 1}\n")  # in-process from here: the same main() the process exit above went through
    assert main(["train", "--config", str(cfg), "--arch", "mmoo"]) == 2
    err = capsys.readouterr().err
    assert "unknown arch 'mmoo'" in err and "Traceback" not in err
