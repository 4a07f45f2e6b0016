"""Checkpoints and resume: safetensors without pickles, atomic writes, corrupt/truncated files detected with the
previous good checkpoint kept, mid-epoch resume bit-identical in process and after a real SIGKILL."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mola.data import ArrayTaskDataset, Scenario, TaskInfo
from mola.engine import RunConfig, Trainer, load_config
from mola.engine.checkpoint import (
    checkpoint_bytes,
    checkpoint_path,
    has_checkpoint,
    load_checkpoint,
    load_latest,
    read_checkpoint_info,
    remove_stale_temp_files,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
OFFICE = REPO.parent / "shared" / "data" / "office_caltech10"


def scenario(n: int = 40) -> Scenario:
    g = torch.Generator().manual_seed(1)

    def ds(k: int) -> ArrayTaskDataset:
        t = torch.arange(k) % 3
        return ArrayTaskDataset(torch.randn(k, 5, generator=g) + t.view(-1, 1), (t + torch.arange(k)) % 2, t)

    return Scenario("syn", "multi_input", [TaskInfo(f"t{i}", num_classes=2) for i in range(3)],
                    ds(n), ds(12), ds(12), (5,))


def cfg(*over: str) -> RunConfig:
    return load_config(None, ["model.backbone.name=mlp", "model.backbone.width=1", "data.batch_size=6",
                              "train.epochs=2", "train.progress=false", "train.tensorboard=false",
                              "train.device=cpu", "optim.lr=0.01", *over])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- format -------------------------------------------------------------------------------------------------------
def test_checkpoint_is_safetensors_and_never_unpickled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = Trainer(cfg("train.epochs=1"), tmp_path / "r", scenario=scenario())
    t.fit()
    path = checkpoint_path(tmp_path / "r", "last")
    assert path.name == "last.safetensors"
    with safe_open(str(path), "pt") as f:  # plain safetensors: model weights readable by any tool
        meta = f.metadata()
        keys = set(f.keys())
        model_keys = {f"model/{k}" for k in t.model.state_dict()}
        assert model_keys <= keys and any(k.startswith("optimizer/state/") for k in keys)
        assert torch.equal(f.get_tensor(next(iter(sorted(model_keys)))),
                           t.model.state_dict()[sorted(model_keys)[0][len("model/"):]])
    assert meta["format"] == "mola-checkpoint" and len(meta["sha256"]) == 64

    def no_torch_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load must not be used for safetensors checkpoints")

    monkeypatch.setattr(torch, "load", no_torch_load)
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 1 and ckpt["position"] == {"epoch": 1, "batch": 0} and ckpt["path"] == str(path)
    assert_same_weights(ckpt["model"], t.model.state_dict())


def test_legacy_pt_checkpoints_load_weights_only_and_refuse_code(tmp_path: Path) -> None:
    ck = tmp_path / "old" / "checkpoints"
    ck.mkdir(parents=True)
    state = {"format": "mola-checkpoint", "config": {}, "model": {"w": torch.ones(2)}, "epoch": 3, "best_epoch": 1}
    torch.save(state, ck / "best.pt")
    assert checkpoint_path(tmp_path / "old", "best") == ck / "best.pt"
    assert torch.equal(load_checkpoint(ck / "best.pt")["model"]["w"], torch.ones(2))

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"format": "mola-checkpoint", "payload": Evil()}, ck / "last.pt")
    with pytest.raises(ValueError, match=r"last\.pt holds pickled objects other than tensors.*refused"):
        load_checkpoint(ck / "last.pt")
    assert not (tmp_path / "pwned").exists()


# -- truncation, corruption, crashes ----------------------------------------------------------------------------------
def test_checkpoint_truncated_at_any_byte_is_corrupt_and_previous_kept(tmp_path: Path) -> None:
    """Every truncation of a small checkpoint is reported as corrupt (naming the file), and resuming falls back
    to the previous good checkpoint, saying so."""
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(lin.parameters())
    lin(torch.ones(1, 3)).sum().backward()
    opt.step()

    def state(step: int) -> dict[str, object]:
        return {"model": lin.state_dict(), "optimizer": opt.state_dict(), "config": {"name": "x"}, "epoch": 0,
                "best_epoch": -1, "step": step, "best_score": float("-inf"), "history": []}

    save_checkpoint(state(1), tmp_path, "last")
    save_checkpoint(state(2), tmp_path, "last")
    last = checkpoint_path(tmp_path, "last")
    data = last.read_bytes()
    assert load_checkpoint(last)["step"] == 2 and len(data) > 1000
    for k in range(len(data)):
        last.write_bytes(data[:k])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert load_latest(tmp_path)["step"] == 1, k
        msg = str(caught[0].message)
        assert f"checkpoint {last} is corrupt or truncated" in msg and "last.prev.safetensors instead" in msg, k


def test_truncated_trainer_checkpoint_resumes_from_previous(tmp_path: Path) -> None:
    run = tmp_path / "r"
    Trainer(cfg("train.epochs=2"), run, scenario=scenario()).fit()
    last = checkpoint_path(run, "last")
    data = last.read_bytes()
    rng = random.Random(0)
    for k in sorted(rng.sample(range(len(data)), 40)) + [len(data) - 1, 8, 0]:
        last.write_bytes(data[:k])
        with pytest.raises(ValueError, match=rf"checkpoint {last} is corrupt or truncated"):
            load_checkpoint(last)
    t = Trainer(cfg("train.epochs=2"), run, scenario=scenario())
    with pytest.warns(RuntimeWarning, match=r"is corrupt or truncated.*resuming from the previous good checkpoint"):
        t.resume()
    assert t.epoch == 1 and t.step == 6  # last.prev: the end of epoch 0 (40 // 6 = 6 batches)


def test_crash_while_writing_keeps_previous_and_stale_temp_files_are_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = {"model": {"w": torch.zeros(3)}, "config": {}, "epoch": 1, "best_epoch": 0}
    save_checkpoint(good, tmp_path, "last")

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({**good, "epoch": 2}, tmp_path, "last")
    monkeypatch.undo()
    assert load_checkpoint(checkpoint_path(tmp_path, "last"))["epoch"] == 1
    folder = tmp_path / "checkpoints"
    assert not [p for p in folder.iterdir() if p.suffix == ".tmp"]  # cleaned on an exception
    (folder / ".last.safetensors.123.ab.tmp").write_bytes(checkpoint_bytes(good)[:50])  # what SIGKILL leaves
    assert [p.name for p in remove_stale_temp_files(tmp_path)] == [".last.safetensors.123.ab.tmp"]
    assert has_checkpoint(tmp_path) and not has_checkpoint(tmp_path / "nope")


# -- resume ---------------------------------------------------------------------------------------------------------
class Killed(Exception):
    """Stands in for SIGKILL right after a checkpoint write."""


@pytest.mark.parametrize("sampling,kill_at", [("mixed", 4), ("balanced", 9)])
def test_mid_epoch_resume_is_bit_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sampling: str,
                                           kill_at: int) -> None:
    """Router + RLW (random weights) + dropout: uninterrupted == stopped mid-epoch at ``kill_at`` + resumed."""
    over = ("model.mola.mode=router", "train.weighting=rlw", f"data.sampling={sampling}", "train.epochs=3",
            "train.checkpoint_every_steps=1")
    a = Trainer(cfg(*over), tmp_path / "a", scenario=scenario())
    a.fit()
    b = Trainer(cfg(*over), tmp_path / "b", scenario=scenario())
    real_save = Trainer.save

    def save_then_die(self: Trainer, which: str | tuple[str, ...] = "last") -> list[Path]:
        paths = real_save(self, which)
        if self.step == kill_at:
            raise Killed
        return paths

    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(Killed):
        b.fit()
    monkeypatch.undo()
    c = Trainer(cfg(*over), tmp_path / "b", scenario=scenario())
    c.resume()
    assert (c.epoch, c.batch_in_epoch, c.step) == (kill_at // 6, kill_at % 6, kill_at)
    c.fit()
    assert_same_weights(a.model.state_dict(), c.model.state_dict())
    assert_same_weights(weights(checkpoint_path(tmp_path / "a", "last")), weights(checkpoint_path(tmp_path / "b",
                                                                                                   "last")))
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in a.history] == \
        [{k: v for k, v in r.items() if k not in drop} for r in c.history]


def test_resume_with_changed_training_settings_warns(tmp_path: Path) -> None:
    # scheduler none: a finished cosine run cannot be extended (test_reliability_kills.py)
    Trainer(cfg("train.epochs=1", "optim.scheduler=none"), tmp_path / "r", scenario=scenario()).fit()
    t = Trainer(cfg("train.epochs=3", "optim.lr=0.1", "optim.scheduler=none"), tmp_path / "r", scenario=scenario())
    with pytest.warns(RuntimeWarning, match=r"changed settings \(optim\.lr: 0\.01 -> 0\.1\)") as rec:
        t.resume()
    changed = [str(w.message) for w in rec if "changed settings" in str(w.message)]
    assert changed and not any("train.epochs" in m for m in changed)  # more epochs is no "changed setting" ...
    assert any("train.epochs 1 -> 3: the run now ends at epoch 3" in str(w.message) for w in rec)  # ... but re-planned


def _mola(*args: str) -> list[str]:
    return [sys.executable, "-m", "mola.cli.main", "train", *args]


@pytest.mark.slow
def test_sigkill_at_random_step_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    """A real ``mola train`` killed with SIGKILL at a random step, then ``--resume``d, ends with exactly the
    weights of an uninterrupted run (CPU, one thread)."""
    if not OFFICE.is_dir():
        pytest.skip("shipped Office-Caltech10 data not found")
    config = tmp_path / "c.yaml"
    config.write_text(
        f"name: kill\ndata: {{kind: office_caltech10, root: {OFFICE}, batch_size: 32, max_per_task: 64,"
        " max_eval_per_task: 16}\nmodel: {backbone: {name: mlp, width: 4}, mola: {mode: router}}\n"
        "train: {epochs: 3, progress: false, tensorboard: false, device: cpu, checkpoint_every_steps: 1,"
        " weighting: rlw, eval_test: false}\noptim: {lr: 0.003}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    total = 3 * (4 * 64 // 32)
    seed = int(os.environ.get("MOLA_TEST_KILL_SEED", "0"))  # seeded: a failure reproduces; vary it to explore
    target = random.Random(seed).randint(2, total - 4)
    ref = subprocess.Popen(_mola("--config", str(config), "--out", str(tmp_path / "ref")), env=env, cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "run"
    victim = subprocess.Popen(_mola("--config", str(config), "--out", str(run)), env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = checkpoint_path(run, "last")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and victim.poll() is None:
        try:
            if read_checkpoint_info(last).get("step", 0) >= target:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.002)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = load_latest(run)["step"]
    assert target <= killed_at < total and not (run / "final.json").exists()
    resumed = subprocess.run(_mola("--config", str(config), "--out", str(run), "--resume"), env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} from last.safetensors at epoch {killed_at // 8}, batch {killed_at % 8}" in resumed.stderr
    assert ref.wait(timeout=300) == 0, ref.stderr.read() if ref.stderr else ""
    assert_same_weights(weights(checkpoint_path(tmp_path / "ref", "last")), weights(last))
    assert_same_weights(weights(checkpoint_path(tmp_path / "ref", "best")), weights(checkpoint_path(run, "best")))
    with open(tmp_path / "ref" / "metrics.csv") as fa, open(run / "metrics.csv") as fb:
        rows_a, rows_b = list(csv.DictReader(fa)), list(csv.DictReader(fb))
    for r in rows_a + rows_b:
        del r["seconds"]
    assert rows_a == rows_b and len(rows_a) == 3
