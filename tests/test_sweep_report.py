"""`mola sweep` planning/skip/resume logic and a tiny real sweep; `mola report` tables on synthetic final.json files."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from mola.analysis.report import build_table, find_runs, read_run_result, to_markdown, write_report
from mola.cli.main import main
from mola.cli.sweep import load_sweep, parse_sweep, plan_sweep, train_command
from mola.data.base import ArrayTaskDataset, Scenario, TaskInfo


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models: torch's intra-op threads only add overhead (seconds per step on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- report ----------------------------------------------------------------------------------------------------


def _final(path: Path, arch: str, seed: int, a: float, b: float, mode: str | None = None, weighting: str = "ew",
           method: str = "erm", override: str | None = None) -> Path:
    path.mkdir(parents=True)
    scores = {"a": {"acc": a, "auc": 0.5, "loss": 1.0}, "b": {"acc": b, "auc": 0.5, "loss": 1.0}}
    final = {"val": scores, "test": scores, "last": {"val": scores, "test": {k: {"acc": 0.1} for k in scores}},
             "arch": arch, "mode": mode, "weighting": weighting, "method": method, "seed": seed}
    (path / "final.json").write_text(json.dumps(final))
    if override is not None:
        (path / "sweep.json").write_text(json.dumps({"override_label": override}))
    return path


@pytest.fixture()
def result_dirs(tmp_path: Path) -> list[Path]:
    root = tmp_path / "runs"
    return [
        _final(root / "st0", "single_task", 0, 0.80, 0.60),
        _final(root / "st1", "single_task", 1, 0.80, 0.60),
        _final(root / "hps0", "hps", 0, 0.70, 0.50),
        _final(root / "hps1", "hps", 1, 0.74, 0.54),
        _final(root / "pc0", "hps", 0, 0.60, 0.30, weighting="pcgrad"),
        _final(root / "g0", "mola", 0, 0.82, 0.62, mode="grad"),
        _final(root / "g1", "mola", 1, 0.84, 0.60, mode="grad"),
        _final(root / "g2", "mola", 2, 0.86, 0.64, mode="grad"),
        _final(root / "r8", "mola", 0, 0.90, 0.40, mode="grad", override="rank=8"),
    ]


def test_report_table_mean_std_delta_and_bold(result_dirs: list[Path]) -> None:
    runs = [read_run_result(p) for p in result_dirs]
    table = build_table(runs, "acc")
    labels = [r.label for r in table.rows]
    assert labels == ["single_task", "hps", "hps+pcgrad", "mola-grad", "mola-grad [rank=8]"]
    assert table.columns == ["a", "b", "Avg", "Delta_m", "Delta_p"]
    grad = table.rows[3]
    assert len(grad.runs) == 3
    assert grad.mean("a") == pytest.approx(0.84) and grad.std("a") == pytest.approx(0.02)  # sample std
    assert grad.mean("Avg") == pytest.approx(np.mean([0.72, 0.72, 0.75]))
    hps = table.rows[1]
    # Delta_m per seed vs single-task means (0.8, 0.6), then averaged: -(1/2)((a-.8)/.8 + (b-.6)/.6) * 100
    dms = [-50 * ((a - 0.8) / 0.8 + (b - 0.6) / 0.6) for a, b in ((0.70, 0.50), (0.74, 0.54))]
    assert hps.mean("Delta_m") == pytest.approx(np.mean(dms)) and hps.mean("Delta_p") == pytest.approx(-np.mean(dms))
    assert table.rows[0].mean("Delta_m") == pytest.approx(0.0)
    assert math.isnan(table.rows[2].std("a"))  # one seed: no std
    md = to_markdown(table)
    lines = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln}
    assert "**90.00**" in lines["mola-grad [rank=8]"]  # best on task a (single seed, no ±)
    assert "**64.00 ± 0.00**" not in md and "**62.00 ± 2.00**" in lines["mola-grad"]  # best on b and Avg
    assert "**73.00 ± 1.73**" in lines["mola-grad"]
    # lowest Delta_m is best and bold
    best_dm = min(r.mean("Delta_m") for r in table.rows)
    assert best_dm == grad.mean("Delta_m") and lines["mola-grad"].count("**") == 2 * 4
    assert "Δm%" in md and "single_task" in md


def test_report_cli_writes_md_csv_png(result_dirs: list[Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rep"
    # a folder of runs is expanded; an explicit run dir works too
    assert main(["report", str(result_dirs[0].parent), "--out", str(out), "--split", "test"]) == 0
    assert "mola-grad" in capsys.readouterr().out
    assert main(["report", str(result_dirs[0].parent)]) == 0  # one folder: the report goes beside its runs
    assert (result_dirs[0].parent / "report" / "report.md").is_file()
    with open(out / "report.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:8] == ["row", "arch", "mode", "weighting", "method", "override", "n_runs", "seeds"]
    assert {"a_mean", "a_std", "b_mean", "avg_mean", "avg_std", "delta_m_mean", "delta_p_std"} <= set(rows[0])
    grad = next(r for r in rows if r["row"] == "mola-grad")
    assert float(grad["a_mean"]) == pytest.approx(0.84) and grad["n_runs"] == "3" and grad["seeds"] == "0 1 2"
    pcgrad = next(r for r in rows if r["row"] == "hps+pcgrad")
    assert pcgrad["a_std"] == "" and pcgrad["weighting"] == "pcgrad"
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG" and (out / "report.md").is_file()
    # last-checkpoint scores, a metric no task has -> falls back to each task's primary metric (acc)
    (table,), _ = write_report(result_dirs[2:4], tmp_path / "rep2", checkpoint="last", metric="miou")
    assert table.rows[0].mean("a") == pytest.approx(0.1) and "Delta_m" not in table.columns
    assert main(["report", str(tmp_path / "nothing")]) == 2
    with pytest.raises(FileNotFoundError, match="no final.json"):
        find_runs([tmp_path / "rep"])


def test_report_dense_tasks_mixed_metrics_and_delta_all(tmp_path: Path) -> None:
    def write(name: str, arch: str, seg: tuple[float, float], depth: tuple[float, float]) -> Path:
        d = tmp_path / name
        d.mkdir()
        test = {"seg": {"miou": seg[0], "pix_acc": seg[1], "loss": 1.0},
                "depth": {"abs_err": depth[0], "rel_err": depth[1], "loss": 1.0}}
        (d / "final.json").write_text(json.dumps({"test": test, "val": test, "arch": arch, "mode": None,
                                                  "weighting": "ew", "method": "erm", "seed": 0}))
        return d

    dirs = [write("st", "single_task", (0.40, 0.80), (0.50, 0.20)), write("h", "hps", (0.44, 0.80), (0.60, 0.20))]
    runs = [read_run_result(d) for d in dirs]
    table = build_table(runs)  # --metric acc: no task has it -> miou and abs_err, no Avg over mixed metrics
    assert table.columns == ["seg", "depth", "Delta_m", "Delta_p"]
    assert table.task_metrics == {"seg": "miou", "depth": "abs_err"} and table.higher_better["depth"] is False
    hps = table.rows[1]
    assert hps.mean("Delta_m") == pytest.approx(50 * (-0.1 + 0.2))  # miou +10% (good), abs_err +20% (bad)
    both = build_table(runs, delta_metrics="all").rows[1]
    assert both.mean("Delta_m") == pytest.approx(50 * ((-0.1 + 0.0) / 2 + (0.2 + 0.0) / 2))
    md = to_markdown(table)
    assert "seg [miou]" in md and "depth [abs_err]" in md and "**0.5**" in md  # lower abs_err is bold


# -- sweep planning ------------------------------------------------------------------------------------------------


def _sweep_file(tmp_path: Path, body: str) -> Path:
    (tmp_path / "base.yaml").write_text("name: base\ntrain: {epochs: 1}\n")
    p = tmp_path / "sweep.yaml"
    p.write_text(body)
    return p


def test_sweep_grid_expansion_and_names(tmp_path: Path) -> None:
    p = _sweep_file(tmp_path, f"""
base: base.yaml
out_dir: {tmp_path / 'out'}
grid: {{arch: [mola, hps], method: [mola_grad, erm], weighting: ew, seed: [0, 1]}}
overrides:
  rank: [model.mola.rank=1, model.mola.rank=4]
  opt: [[optim.lr=0.1, optim.name=sgd], {{small: optim.lr=0.01}}]
""")
    spec = load_sweep(p)
    assert spec.base == tmp_path / "base.yaml"  # resolved next to the sweep file
    plan = plan_sweep(spec)
    assert len(plan) == 2 * 2 * 1 * 2 * 2 * 2
    names = [r.name for r in plan]
    assert len(set(names)) == len(names)
    first = plan[0]
    assert first.name == "mola-mola_grad-ew-rank=1-lr=0.1+name=sgd-s0"
    assert first.overrides == ["model.mola.rank=1", "optim.lr=0.1", "optim.name=sgd"]
    assert first.override_label == "rank=1,lr=0.1+name=sgd" and first.run_dir == tmp_path / "out" / first.name
    small = next(r for r in plan if "small" in r.name)
    assert small.override_axes == {"rank": "rank=1", "opt": "small"}
    invalid = [r for r in plan if r.status == "invalid"]
    assert {(r.arch, r.method) for r in invalid} == {("hps", "mola_grad")} and len(invalid) == 8
    assert all(r.status == "new" for r in plan if r not in invalid)
    cmd = train_command(first, spec)
    assert cmd[1:4] == ["-m", "mola.cli.main", "train"]
    assert cmd[cmd.index("--method") + 1] == "mola_grad" and cmd[cmd.index("--seed") + 1] == "0"
    assert "--resume" not in cmd and "model.mola.rank=1" in cmd
    # no grid at all: one run named "run"
    assert [r.name for r in plan_sweep(parse_sweep({"base": str(tmp_path / "base.yaml")}))] == ["run"]


def test_sweep_errors(tmp_path: Path) -> None:
    base = str(_sweep_file(tmp_path, "").parent / "base.yaml")
    with pytest.raises(ValueError, match="unknown sweep key"):
        parse_sweep({"base": base, "grids": {}})
    with pytest.raises(ValueError, match="unknown sweep grid axis.*lr"):
        parse_sweep({"base": base, "grid": {"lr": [1]}})
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        parse_sweep({"base": "nope.yaml"})
    with pytest.raises(ValueError, match="dotted.key=value"):
        parse_sweep({"base": base, "overrides": {"r": ["rank4"]}})
    with pytest.raises(ValueError, match="integers"):
        parse_sweep({"base": base, "grid": {"seed": ["a"]}})
    p = _sweep_file(tmp_path, "base: base.yaml\ngrid: {arch: [x]\n")
    assert main(["sweep", "--config", str(p)]) == 2


def test_sweep_skips_complete_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _sweep_file(tmp_path, f"base: base.yaml\nout_dir: {tmp_path / 'out'}\ngrid: {{seed: [0, 1, 2]}}\n")
    spec = load_sweep(p)
    done, half, _ = (spec.out_dir / f"s{i}" for i in range(3))
    done.mkdir(parents=True)
    (done / "final.json").write_text(json.dumps({"mean": {"val": {"acc": 0.5}, "test": {"acc": 0.4}}}))
    (half / "checkpoints").mkdir(parents=True)
    (half / "checkpoints" / "last.pt").write_bytes(b"")
    plan = plan_sweep(spec)
    assert [r.status for r in plan] == ["complete", "resume", "new"]
    assert "--resume" in train_command(plan[1], spec)
    assert main(["sweep", "--config", str(p), "--dry-run"]) == 0
    out = capsys.readouterr().out.split()
    assert out == ["complete", "s0", "resume", "s1", "new", "s2"]


# -- one tiny real sweep through the engine ----------------------------------------------------------------------


def _scenario() -> Scenario:
    g = torch.Generator().manual_seed(0)

    def ds(k: int) -> ArrayTaskDataset:
        t = torch.arange(k) % 2
        return ArrayTaskDataset(torch.randn(k, 1, 4, 4, generator=g) + t.view(-1, 1, 1, 1), t.clone(), t)

    return Scenario("syn", "multi_input", [TaskInfo("t0", num_classes=2), TaskInfo("t1", num_classes=2)],
                    ds(24), ds(12), ds(12), (1, 4, 4))


def test_tiny_real_sweep_resume_and_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        import mola.engine.trainer as trainer_mod
    except ImportError as err:
        pytest.skip(f"the engine is not importable yet ({err})")
    monkeypatch.setattr(trainer_mod, "build_scenario", lambda cfg: _scenario())  # data built in-process
    (tmp_path / "base.yaml").write_text(
        "name: base\nmodel: {backbone: {name: mlp, width: 1}}\ndata: {batch_size: 8}\n"
        "train: {epochs: 1, progress: false, tensorboard: false, device: cpu}\n")
    p = tmp_path / "sweep.yaml"
    p.write_text(f"base: base.yaml\nout_dir: {tmp_path / 'out'}\ngrid: {{arch: [mola, hps], seed: [0]}}\n")
    assert main(["sweep", "--config", str(p), "--no-progress"]) == 0
    out = tmp_path / "out"
    for name in ("mola-s0", "hps-s0"):
        assert (out / name / "final.json").is_file() and (out / name / "sweep.json").is_file()
    with open(out / "sweep_summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["trained", "trained"] and "test_mean_acc" in rows[0]
    # a run interrupted after its last checkpoint is resumed, a complete one skipped
    (out / "hps-s0" / "final.json").unlink()
    assert main(["sweep", "--config", str(p), "--no-progress"]) == 0
    with open(out / "sweep_summary.csv") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["skipped", "resumed"]
    assert (out / "hps-s0" / "final.json").is_file()
    (table,), files = write_report([out], tmp_path / "rep")
    assert [r.label for r in table.rows] == ["hps", "mola-grad"] and table.columns == ["t0", "t1", "Avg"]
    assert files["png"].is_file()


def test_sweep_records_a_failed_run_and_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        import mola.engine  # noqa: F401
    except ImportError as err:
        pytest.skip(f"the engine is not importable yet ({err})")
    p = _sweep_file(tmp_path, f"base: base.yaml\nout_dir: {tmp_path / 'out'}\ngrid: {{weighting: [nope, nada]}}\n")
    assert main(["sweep", "--config", str(p), "--dry-run"]) == 0  # unknown names: invalid when planned
    assert "invalid: nope: unknown weighting 'nope'" in capsys.readouterr().err
    (tmp_path / "base.yaml").write_text(f"name: base\ntrain: {{epochs: 1}}\ndata: {{root: {tmp_path / 'nodata'}}}\n")
    p.write_text(f"base: base.yaml\nout_dir: {tmp_path / 'out'}\ngrid: {{seed: [0, 1]}}\n")
    assert main(["sweep", "--config", str(p), "--no-progress"]) == 1  # the data folder is missing: both fail
    with open(tmp_path / "out" / "sweep_summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["failed", "failed"] and "nodata" in rows[0]["error"]
    assert "failed: s0" in capsys.readouterr().err
