"""`mola report --paired`: paired-by-seed differences against scipy, verdicts, and refusing to pool mixed configs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from mola.analysis.paired import by_seed, paired_difference
from mola.analysis.report import build_table, paired_rows, read_run_result, write_report
from mola.cli.main import main


def _run(path: Path, arch: str, seed: int, scores: dict[str, float], **cfg_over: object) -> Path:
    """A hand-made finished run: final.json with test accuracies and a config.yaml (overrides as dotted keys)."""
    path.mkdir(parents=True)
    res = {t: {"acc": v, "loss": 1.0} for t, v in scores.items()}
    (path / "final.json").write_text(json.dumps({"val": res, "test": res, "arch": arch, "mode": None,
                                                 "weighting": "ew", "method": "erm", "seed": seed}))
    cfg: dict = {"name": path.name, "data": {"kind": "medmnist", "root": "data/med"},
                 "model": {"arch": arch}, "train": {"seed": seed}}
    for key, value in cfg_over.items():
        node = cfg
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return path


def test_paired_difference_matches_scipy_t_interval() -> None:
    a = {0: 0.71, 1: 0.74, 2: 0.69, 3: 0.80, 4: 0.77}
    b = {0: 0.70, 1: 0.70, 2: 0.71, 3: 0.74, 4: 0.72, 9: 0.99}  # seed 9 has no partner: dropped
    r = paired_difference(a, b)
    d = np.array([a[s] - b[s] for s in range(5)])
    low, high = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert r.n == 5 and r.seeds == (0, 1, 2, 3, 4)
    assert r.mean == pytest.approx(d.mean()) and (r.low, r.high) == pytest.approx((low, high))
    assert (r.wins, r.losses, r.ties) == (4, 1, 0)
    assert r.verdict == ("better" if low > 0 else "unresolved")
    # scipy's paired t-test agrees with the interval: p < 0.05 exactly when 0 is outside it
    p = stats.ttest_rel([a[s] for s in range(5)], [b[s] for s in range(5)]).pvalue
    assert (p < 0.05) == (low > 0 or high < 0)
    # lower-is-better metrics are signed so that + means better
    lower = paired_difference({0: 1.0, 1: 2.0}, {0: 3.0, 1: 3.0}, higher_is_better=False)
    assert lower.mean == pytest.approx(1.5) and lower.wins == 2


def test_paired_verdicts_and_degenerate_cases() -> None:
    worse = paired_difference({s: 0.5 - 0.01 * s for s in range(4)}, {s: 0.6 for s in range(4)})
    assert worse.verdict == "worse" and worse.high < 0
    same = paired_difference({0: 0.5, 1: 0.5}, {0: 0.5, 1: 0.5})
    assert same.verdict == "unresolved" and same.ties == 2 and same.low == same.high == 0.0
    one = paired_difference({0: 0.9}, {0: 0.1})
    assert one.n == 1 and math.isnan(one.low) and one.verdict == "unresolved"
    nan = paired_difference({0: math.nan, 1: 0.2, 2: 0.3}, {0: 0.1, 1: 0.1, 2: 0.1})
    assert nan.n == 2 and nan.seeds == (1, 2)
    # two equal differences: a zero-width interval, but too few pairs for a verdict; three consistent ones decide
    two = paired_difference({0: 0.3, 1: 0.3}, {0: 0.1, 1: 0.1})
    assert two.low == two.high and two.verdict == "unresolved"
    assert paired_difference({s: 0.3 for s in range(3)}, {s: 0.1 for s in range(3)}).verdict == "better"
    with pytest.raises(ValueError, match="two runs with seed 3"):
        by_seed([3, 3], [0.1, 0.2], "row 'hps'")
    with pytest.raises(ValueError, match="confidence"):
        paired_difference({0: 1.0}, {0: 1.0}, confidence=1.5)


def test_report_paired_table_columns_and_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "runs"
    ref = {0: (0.80, 0.60), 1: (0.82, 0.58), 2: (0.79, 0.61)}
    grad = {0: (0.84, 0.61), 1: (0.85, 0.60), 2: (0.83, 0.63)}
    for s in ref:
        _run(root / f"st-s{s}", "single_task", s, dict(zip("ab", ref[s], strict=True)))
        _run(root / f"hps-s{s}", "hps", s, dict(zip("ab", grad[s], strict=True)))
    table = build_table([read_run_result(p) for p in sorted(root.iterdir())])
    base, rows = paired_rows(table, "single_task")
    assert base.label == "single_task" and [r.label for r in rows] == ["hps"]
    res = rows[0].results
    assert set(res) == {"a", "b", "Avg", "Delta_m"}
    d_avg = [np.mean(grad[s]) - np.mean(ref[s]) for s in ref]
    low, high = stats.t.interval(0.95, 2, loc=np.mean(d_avg), scale=stats.sem(d_avg))
    assert res["Avg"].mean == pytest.approx(np.mean(d_avg)) and res["Avg"].low == pytest.approx(low)
    assert res["Avg"].high == pytest.approx(high) and res["a"].wins == 3
    # Delta_m: lower is better; every hps seed is above the single-task mean on both tasks -> better
    assert res["Delta_m"].mean > 0 and res["Delta_m"].verdict == "better"
    assert main(["report", str(root), "--paired", "single_task", "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "Paired by seed against `single_task`" in out and "| hps | Avg | 3 |" in out
    assert "| hps | 3 | " in out and ": **better** |" in out  # the summary line (Avg, Δm)
    with open(tmp_path / "rep" / "paired.csv") as fh:
        lines = list(csv.DictReader(fh))
    avg = next(r for r in lines if r["column"] == "avg")
    assert float(avg["ci_low"]) == pytest.approx(low) and avg["seeds"] == "0 1 2" and avg["wins"] == "3"
    assert main(["report", str(root), "--paired", "nope"]) == 2
    assert "names no row" in capsys.readouterr().err
    assert main(["report", str(root), "--paired", "hps", "--out", str(tmp_path / "rep2")]) == 0  # by arch


def test_report_refuses_to_pool_runs_with_different_configs(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    _run(root / "g-s0", "hps", 0, {"a": 0.8}, model__mola__rank=4)
    _run(root / "g-s1", "hps", 1, {"a": 0.8}, model__mola__rank=8)
    with pytest.raises(ValueError, match=r"configs differ other than by seed.*model\.mola\.rank: 4 vs 8"):
        write_report([root], tmp_path / "rep")
    # cosmetic keys (device, progress, out_dir), the seed, and a relative vs absolute data.root may differ
    ok = tmp_path / "ok"
    _run(ok / "s0", "hps", 0, {"a": 0.8}, train__device="cpu", train__progress=False)
    _run(ok / "s1", "hps", 1, {"a": 0.7}, train__device="cuda", out_dir="elsewhere",
         data__root=str(Path("data/med").resolve()))
    (table,), _ = write_report([ok], tmp_path / "rep_ok")
    assert len(table.rows) == 1 and table.rows[0].mean("a") == pytest.approx(0.75)


def test_report_splits_scenarios_into_separate_tables(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    _run(root / "med-s0", "hps", 0, {"a": 0.8})
    _run(root / "oc-s0", "hps", 0, {"amazon": 0.7}, data__kind="office_caltech10", data__root="data/oc")
    tables, files = write_report([root], tmp_path / "rep")
    assert [t.columns[0] for t in tables] == ["a", "amazon"]
    md = files["md"].read_text()
    assert "mola report 1/2 (kind=medmnist" in md and "mola report 2/2 (kind=office_caltech10" in md
    assert files["png_1"].is_file() and files["png_2"].is_file()
    with open(files["csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["scenario"].split(",")[0] for r in rows] == ["kind=medmnist", "kind=office_caltech10"]


def test_report_marks_rows_selected_on_test(tmp_path: Path) -> None:
    """A run whose checkpoint was chosen on test (final.json selection.valid_protocol false) is flagged."""
    root = tmp_path / "runs"
    _run(root / "ok-s0", "hps", 0, {"a": 0.8})
    paper = _run(root / "paper-s0", "single_task", 0, {"a": 0.9}, train__select_on="test_loss")
    final = json.loads((paper / "final.json").read_text())
    final["selection"] = {"on": "test_loss", "valid_protocol": False}
    (paper / "final.json").write_text(json.dumps(final))
    (table,), files = write_report([root], tmp_path / "rep")
    md = files["md"].read_text()
    assert "| single_task † |" in md and "| hps |" in md
    assert "selected on the test split" in md


def test_report_shows_trainable_parameters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every table row, the paired summary and report.csv carry the runs' trainable parameters (final.json's
    ``trainable_parameters``; older runs: ``parameters.total``; a mean marked "~" when seeds differ)."""
    root = tmp_path / "runs"
    for s in range(3):
        for arch, count in (("hps", 1000), ("mola", 1234567 + s)):
            run = _run(root / f"{arch}-s{s}", arch, s, {"a": 0.8 + 0.01 * s + (arch == "mola") * 0.02})
            final = json.loads((run / "final.json").read_text())
            if arch == "hps":
                final["parameters"] = {"backbone": 900, "heads": 100, "total": count}  # an older run
            else:
                final["trainable_parameters"] = count
            (run / "final.json").write_text(json.dumps(final))
    assert main(["report", str(root), "--paired", "hps", "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "| method | n | trainable params |" in out
    assert "| hps | 3 | 1,000 |" in out and "| mola-grad | 3 | ~1,234,568 |" in out
    assert "the reference has 1,000 trainable parameters" in out
    with open(tmp_path / "rep" / "report.csv") as fh:
        counts = {r["row"]: r["trainable_params"] for r in csv.DictReader(fh)}
    assert counts == {"hps": "1000", "mola-grad": "1234568"}
