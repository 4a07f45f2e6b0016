"""Reliability round 3 (issue 24): bounded YAML, numbers in scientific notation, data that is there but
unusable, tasks without val/test rows, and the errors that must name the file and the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fixtures_data import make_image_tree
from fixtures_runs import make_data, train_tiny_run, write_test_pngs
from mola.cli.main import main
from mola.engine.config import check_values, load_config

BOMB = "".join([
    "name: bomb\nmodel:\n  options:\n",
    "    a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n",
    *(f"    {b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)),
])
"""Nine nested levels of nine aliases: 9**9 (387 million) values once expanded, a few hundred bytes of YAML."""

CAPPED = """
import resource, sys, time
from mola.cli.main import main
import mola.engine  # torch and the engine are loaded before the cap
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, vm + 2**30))  # 1 GiB more than the loaded interpreter
start = time.perf_counter()
code = main(["train", "--config", sys.argv[1], "--dry-run"])
print(f"seconds={time.perf_counter() - start:.3f}")
sys.exit(code)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmSize from /proc (Linux)")
def test_alias_bomb_is_refused_in_seconds_under_a_memory_cap(tmp_path: Path) -> None:
    config = tmp_path / "bomb.yaml"
    config.write_text(BOMB)
    import mola

    env = {**os.environ, "PYTHONPATH": str(Path(mola.__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CAPPED, str(config)], capture_output=True, text=True, timeout=120,
                          env=env)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(err) == 1 and "Traceback" not in proc.stderr
    assert str(config) in err[0] and "anchors/aliases expand to more than" in err[0]
    assert float(proc.stdout.split("seconds=")[1]) < 3.0


def test_alias_bomb_in_an_override_and_plain_aliases_still_work(tmp_path: Path) -> None:
    levels = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
        f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi", strict=True)]
    with pytest.raises(ValueError, match="override 'train.weighting_options=.*anchors/aliases expand"):
        load_config(None, ["train.weighting_options={" + ", ".join(levels) + "}"])
    config = tmp_path / "ok.yaml"
    config.write_text("name: x\nmodel: {options: &o {a: 1}}\ntrain: {weighting_options: *o}\n")
    assert load_config(config).train.weighting_options == {"a": 1}


def test_scientific_notation_reads_as_a_number(tmp_path: Path) -> None:
    cfg = load_config(None, ["optim.lr=1e-3", "optim.weight_decay=1.0e12", "optim.grad_clip=2E+1"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.grad_clip) == (1e-3, 1e12, 20.0)
    config = tmp_path / "c.yaml"
    config.write_text("optim: {lr: 5e-4, momentum: 9e-1}\nname: '1e3'\n")
    cfg = load_config(config)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.name) == (5e-4, 0.9, "1e3")


class NoCopy:
    def __deepcopy__(self, memo: dict) -> NoCopy:
        raise AssertionError("a free-form option was deep-copied")


def test_value_checks_never_copy_free_form_options() -> None:
    cfg = load_config(None, ["optim.lr=0.1"])
    cfg.model.options = {"shared": NoCopy()}
    cfg.train.weighting_options = {"x": NoCopy()}
    check_values(cfg)
    cfg.optim.lr = -1.0
    with pytest.raises(ValueError, match="optim.lr must be > 0"):
        check_values(cfg)


def test_config_that_is_a_folder_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "a.yaml").write_text("name: a\n")
    assert main(["train", "--config", str(tmp_path / "cfgs"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"config file {tmp_path / 'cfgs'} is a folder, not a YAML file (it holds a.yaml)" in err
    assert "Did you mean" not in err


# ------------------------------------------------------------------------------------------------ data
def _folder_cfg(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--out", str(out), f"data.root={root}", "data.kind=folder", "data.image_size=8",
            "data.batch_size=8", "model.backbone.name=mlp", "model.backbone.width=4", "train.epochs=1",
            "train.progress=false", "train.tensorboard=false", "train.device=cpu", *extra]


def test_domain_without_val_rows_is_an_error_unless_allowed_and_then_marked(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    root = make_image_tree(tmp_path / "data", {"big": {"c0": 12, "c1": 12}, "tiny": {"c0": 2, "c1": 2}})
    run = tmp_path / "run"
    assert main(_folder_cfg(root, run)) == 2
    err = capsys.readouterr().err
    assert "no val rows: 'tiny'" in err and "train.allow_missing_eval=true" in err
    assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()
    with pytest.warns(RuntimeWarning, match="allow_missing_eval"):
        assert main(_folder_cfg(root, run, "train.allow_missing_eval=true")) == 0
    final = json.loads((run / "final.json").read_text())
    assert "tiny" in final["missing_eval"]["val"] and "tiny" not in final["val"]
    capsys.readouterr()
    assert main(["report", str(run), "--split", "val", "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert " ‡ |" in md and "‡ trained with train.allow_missing_eval" in md and "val: tiny" in md


@pytest.mark.parametrize("target", ["dangling", "/dev/zero", "folder"])
def test_npy_file_that_is_not_a_regular_file_is_an_error(tmp_path: Path, target: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    task = tmp_path / "med" / "dermamnist"
    task.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        np.save(task / f"{split}_images.npy", rng.integers(0, 255, (12, 8, 8), dtype=np.uint8))
        np.save(task / f"{split}_labels.npy", np.arange(12).reshape(-1, 1) % 2)
    bad = task / "train_images.npy"
    bad.unlink()
    if target == "dangling":
        bad.symlink_to(tmp_path / "gone.npy")
    elif target == "folder":
        bad.mkdir()
    else:
        if not Path(target).exists():
            pytest.skip(f"{target} not present")
        bad.symlink_to(target)
    assert main(["train", "--dry-run", f"data.root={tmp_path / 'med'}", "data.kind=medmnist"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and len(err.strip().splitlines()) == 1
    assert {"dangling": "which does not exist", "folder": "is a folder",
            "/dev/zero": "not a regular file"}[target] in err


# ---------------------------------------------------------------------------------------------- errors
def test_predict_on_a_decompression_bomb_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    run = train_tiny_run(tmp_path, "mola_router")
    images = tmp_path / "imgs"
    write_test_pngs(tmp_path / "data", images, per_task=1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 784 px > 2 * 300: what PIL calls a bomb
    capsys.readouterr()  # training's per-epoch lines
    assert main(["predict", "--checkpoint", str(run), "--images", str(images), "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "decompression-bomb limit" in err and str(images) in err
    assert not (tmp_path / "p.csv").exists()


def test_export_errors_name_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = train_tiny_run(tmp_path, "mola_router")
    (tmp_path / "afile").write_text("x")
    assert main(["export", "--checkpoint", str(run), "--task", "0", "--out", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'afile'} is a file, not a folder" in err and "Errno" not in err
    # a router run with 8 adapters for 2 tasks: --mixing expert has no task adapter; the CLI's fix is named
    data = make_data(tmp_path / "data")
    e8 = tmp_path / "e8"
    assert main(["train", "--out", str(e8), "--method", "mola_router", f"data.root={data}", "data.kind=medmnist",
                 "data.channels=1", "data.batch_size=32", "model.backbone.name=small_cnn", "model.backbone.width=4",
                 "model.mola.num_experts=8", "train.epochs=1", "train.progress=false", "train.tensorboard=false",
                 "train.device=cpu"]) == 0
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(e8), "--task", "0", "--mixing", "expert",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "8 adapters for 2 tasks" in err and "--mixing task-mean" in err and "weights=" not in err


def test_missing_best_checkpoint_points_at_last(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = train_tiny_run(tmp_path, "mola_grad")
    for p in (run / "checkpoints").glob("best*"):
        p.unlink()
    assert main(["analyze", str(run)]) == 2
    err = capsys.readouterr().err
    assert "has no best checkpoint" in err and "--checkpoint last" in err
    assert main(["analyze", str(run), "--checkpoint", "last", "--out", str(tmp_path / "an")]) == 0


@pytest.mark.parametrize("config", ["not json {", "[1, 2]"])
def test_load_adapters_with_a_bad_config_names_the_file(tmp_path: Path, config: str) -> None:
    import torch
    from safetensors.torch import save_file

    import mola
    from mola.files import tensors_sha256
    from mola.inject import MoLAConfig

    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    m = mola.inject(net, MoLAConfig(num_experts=2, rank=2, target_modules=["0"]))
    path = tmp_path / "a.safetensors"
    m.save_adapters(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    save_file(tensors, str(path), metadata={"format": "mola-adapters", "config": config,
                                            "sha256": tensors_sha256(config, tensors)})
    with pytest.raises(ValueError, match=rf"adapter file {path}: its 'config' metadata .*re-export"):
        m.load_adapters(path)


# ---------------------------------------------------------------------------------------------- report
def _run(path: Path, arch: str, seed: int, acc: float, text: str | None = None, **train: object) -> Path:
    path.mkdir(parents=True)
    res = {"a": {"acc": acc, "loss": 1.0}}
    (path / "final.json").write_text(text if text is not None else json.dumps(
        {"val": res, "test": res, "arch": arch, "mode": None, "weighting": "ew", "method": "erm", "seed": seed}))
    (path / "config.yaml").write_text(yaml.safe_dump({"name": path.name, "data": {"kind": "medmnist", "root": "d"},
                                                      "model": {"arch": arch}, "train": {"seed": seed, **train}}))
    return path


def test_report_on_a_corrupt_final_json_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run(tmp_path / "runs" / "ok", "hps", 0, 0.8)
    bad = _run(tmp_path / "runs" / "bad", "hps", 1, 0.8, text='{"val":\n\n')
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert str(bad / "final.json") in err and "is not valid JSON" in err
    _run(tmp_path / "runs2" / "list", "hps", 1, 0.8, text="[1]")
    assert main(["report", str(tmp_path / "runs2"), "--out", str(tmp_path / "rep")]) == 2
    assert "must hold a JSON object" in capsys.readouterr().err


def test_paired_refuses_rows_that_differ_by_more_than_seed(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "runs"
    for s in range(3):
        _run(root / f"st-s{s}", "single_task", s, 0.7 + 0.01 * s, epochs=1)
        _run(root / f"hps-s{s}", "hps", s, 0.75 + 0.01 * s, epochs=3)
    out = tmp_path / "rep"
    assert main(["report", str(root), "--paired", "single_task", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "train.epochs: 1 vs 3" in err and "--allow-diff train.epochs" in err
    assert not out.exists() or not any(out.iterdir())  # nothing written
    assert main(["report", str(root), "--paired", "single_task", "--allow-diff", "train.epochs", "--out",
                 str(out)]) == 0
    assert (out / "paired.csv").is_file()
    # keys that the rows' sweep variants set are the rows' own (their labels show them): no --allow-diff needed
    for s in range(3):
        for name, epochs in (("st", 1), ("hps", 3)):
            (root / f"{name}-s{s}" / "sweep.json").write_text(json.dumps(
                {"overrides": [f"train.epochs={epochs}"], "override_label": f"e{epochs}"}))
    assert main(["report", str(root), "--paired", "single_task", "--out", str(tmp_path / "rep2")]) == 0
    assert (tmp_path / "rep2" / "paired.csv").is_file()


def test_paired_reference_missing_in_one_scenario_writes_nothing(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "runs"
    for s in range(2):
        _run(root / f"st-s{s}", "single_task", s, 0.7)
        _run(root / f"hps-s{s}", "hps", s, 0.8)
    other = _run(root / "oc-s0", "single_task", 0, 0.6)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["data"]["kind"] = "office_caltech10"
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "rep"
    assert main(["report", str(root), "--paired", "hps", "--out", str(out)]) == 2
    assert "names no row" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
