"""Every script in examples/ runs, at tiny sizes, as a user would run it, and produces what it says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
pytestmark = pytest.mark.slow  # end-to-end: each example in a fresh process


def run_example(name: str, args: list[str], cwd: Path) -> str:
    """Run ``examples/<name>`` in a fresh process; return its stdout (the test fails on a non-zero exit)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_every_example_is_tested() -> None:
    tested = {"own_loop_torchvision.py", "vit.py", "custom_folder_dataset.py", "sweep_and_report.py",
              "paired_analysis.py", "gain_vs_conflict.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_own_loop_torchvision(tmp_path: Path) -> None:
    out = run_example("own_loop_torchvision.py", ["--steps", "2", "--image-size", "32", "--batch-size", "12",
                                                  "--eval-size", "24", "--out", "out"], tmp_path)
    assert "grad: test accuracy" in out and "router: test accuracy" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for mode in ("grad", "router"):
        assert 0.0 <= summary[mode]["mean"] <= 1.0
        assert (tmp_path / "out" / f"{mode}_model.pt").is_file()
        assert (tmp_path / "out" / f"{mode}_adapters.safetensors").is_file()
    assert summary["grad"]["merge_max_abs_diff"] < 1e-4  # the merged plain ResNet-18 equals the MoLA model


@pytest.mark.parametrize(("backbone", "wrapped"), [("vit_small", "blocks.1.attn.qkv"),
                                                   ("torchvision", "encoder.layers.encoder_layer_1.mlp.0")])
def test_vit(tmp_path: Path, backbone: str, wrapped: str) -> None:
    out = run_example("vit.py", ["--backbone", backbone, "--steps", "2", "--image-size", "16", "--dim", "16",
                                 "--depth", "2", "--mola-blocks", "1", "--batch-size", "12", "--eval-size", "24",
                                 "--router-input-size", "16", "--out", "out"], tmp_path)
    assert "test accuracy (no domain ids)" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert wrapped in summary["mola_layers"]
    assert len(summary["mean_router_weights"]) == 3 and 0.0 <= summary["domain_inference_accuracy"] <= 1.0


def test_custom_folder_dataset(tmp_path: Path) -> None:
    out = run_example("custom_folder_dataset.py", ["--images-per-class", "5", "--epochs", "1", "--image-size", "16",
                                                   "--width", "4", "--batch-size", "16", "--out", "out"], tmp_path)
    assert "re-evaluated checkpoint matches final.json: True" in out
    assert len(list((tmp_path / "out" / "data").glob("*/*/*.png"))) == 3 * 3 * 5
    run = tmp_path / "out" / "runs" / "shapes_mola_grad"
    for name in ("config.yaml", "metrics.csv", "final.json", "eval.json"):
        assert (run / name).is_file(), name
    assert any((run / "checkpoints").iterdir())
    final = json.loads((run / "final.json").read_text())
    assert set(final["test"]) == {"photo", "sketch", "noisy"}


def test_sweep_and_report(tmp_path: Path) -> None:
    out = run_example("sweep_and_report.py", ["--seeds", "2", "--variants", "single_task", "mola_grad",
                                              "--epochs", "1", "--images-per-class", "4", "--image-size", "16",
                                              "--width", "4", "--out", "out"], tmp_path)
    assert "$ mola report" in out
    runs = tmp_path / "out" / "runs"
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == [
        "mola_grad-s0", "mola_grad-s1", "single_task-s0", "single_task-s1"]
    report = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "mola-grad" in report and "single_task" in report and "Δm%" in report
    assert (tmp_path / "out" / "report" / "report.png").is_file()


def test_paired_analysis_matches_scipy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """examples/paired_analysis.py on hand-made run folders (in-process: it only reads files): seeds pair up
    whatever the folder order, and the interval equals scipy's t interval of the paired differences."""
    import importlib.util

    from scipy import stats

    from mola.engine.config import RunConfig, dump_config

    method = {0: 0.70, 1: 0.52, 2: 0.78, 3: 0.66, 4: 0.74}
    reference = {0: 0.60, 1: 0.45, 2: 0.70, 3: 0.62, 4: 0.50}
    for group, values in (("with", method), ("without", reference)):
        for seed, v in values.items():
            run = tmp_path / f"{group}-s{(seed * 3) % 5}"  # folder names do not follow seeds: pairing must not either
            (run / "an").mkdir(parents=True)
            cfg = RunConfig()
            cfg.train.seed = seed
            dump_config(cfg, run / "config.yaml")
            (run / "an" / "routing.json").write_text(json.dumps({"task_inference_accuracy": v}))
    spec = importlib.util.spec_from_file_location("paired_analysis", EXAMPLES / "paired_analysis.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--method", str(tmp_path / "with-s*"), "--reference", str(tmp_path / "without-s*"),
                 "--analysis", "an", "--keys", "task_inference_accuracy"])
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| task_inference")][0]
    d = [method[s] - reference[s] for s in range(5)]
    low, high = stats.t.interval(0.95, 4, loc=sum(d) / 5, scale=stats.sem(d))
    assert low > 0 and f"[{low:+.4f}, {high:+.4f}]" in row and "| 5/0 |" in row and "| better |" in row



def test_gain_vs_conflict_pairs_by_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """examples/gain_vs_conflict.py on hand-made runs: per-point gains and the contrast of two points equal
    scipy's t intervals of the paired differences; the conflict value is the mean pair cosine of conflict.csv."""
    import importlib.util

    from scipy import stats

    from mola.engine.config import RunConfig, dump_config

    acc = {("lo", "m"): [0.80, 0.82, 0.79, 0.85], ("lo", "r"): [0.81, 0.80, 0.80, 0.84],
           ("hi", "m"): [0.70, 0.74, 0.69, 0.77], ("hi", "r"): [0.62, 0.70, 0.61, 0.70]}
    for (point, group), values in acc.items():
        for seed, v in enumerate(values):
            run = tmp_path / point / f"{group}-s{3 - seed}"  # folder order is not seed order
            run.mkdir(parents=True)
            cfg = RunConfig()
            cfg.train.seed = seed
            dump_config(cfg, run / "config.yaml")
            (run / "final.json").write_text(json.dumps({"mean": {"test": {"acc": v}}}))
        (tmp_path / point / "cf").mkdir(exist_ok=True)
        cos = [0.3, 0.1] if point == "lo" else [-0.2, 0.0]
        (tmp_path / point / "cf" / "conflict.csv").write_text(
            "layer,task_a,task_b,cosine,ci_low,ci_high,neg_fraction,norm_ratio,n\n"
            + "".join(f"ALL,a,b{i},{c},,,0,1,8\n" for i, c in enumerate(cos)) + "layer4,a,b,0.9,,,0,1,8\n")
    spec = importlib.util.spec_from_file_location("gain_vs_conflict", EXAMPLES / "gain_vs_conflict.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = []
    for point in ("lo", "hi"):
        args += ["--point", point, str(tmp_path / point / "m-s*"), str(tmp_path / point / "r-s*"),
                 str(tmp_path / point / "cf")]
    module.main(args + ["--contrast", "hi", "lo", "--out", str(tmp_path / "out")])
    text = capsys.readouterr().out
    gain = {p: [100 * (m - r) for m, r in zip(acc[(p, "m")], acc[(p, "r")], strict=True)] for p in ("lo", "hi")}
    for p, conflict in (("lo", 0.2), ("hi", -0.1)):
        d = gain[p]
        low, high = stats.t.interval(0.95, 3, loc=np.mean(d), scale=stats.sem(d))
        assert f"| {p} | {conflict:+.3f} | 4 | {np.mean(d):+.2f} [{low:+.2f}, {high:+.2f}]" in text
    d = [h - lo for h, lo in zip(gain["hi"], gain["lo"], strict=True)]
    low, high = stats.t.interval(0.95, 3, loc=np.mean(d), scale=stats.sem(d))
    assert f"contrast gain[hi] - gain[lo], paired by seed: {np.mean(d):+.2f} [{low:+.2f}, {high:+.2f}]" in text
    assert (tmp_path / "out" / "gain_vs_conflict.png").is_file()
