"""Task conflict (mola.engine.conflict, `mola conflict`): against a direct float64 computation, two built cases
(cosine +1 and -1), the shifted_digits knob ordered by measured conflict, and conflict logged during training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fixtures_data import make_nyuv2, make_office, shared_dir
from mola.cli.main import main
from mola.data.base import ArrayTaskDataset, Scenario, TaskInfo
from mola.engine import Trainer, load_config
from mola.engine.conflict import (
    ALL,
    conflict_levels,
    measure_conflict,
    model_conflict,
    pair_statistics,
    summary_columns,
)
from mola.models import ModelConfig, build_model


class TwoLayer(nn.Module):
    """A shared two-layer trunk (no batch-coupled layers) with one linear head per task, float64."""

    def __init__(self, tasks: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6).double()
        self.fc2 = nn.Linear(6, 4).double()
        self.heads = nn.ModuleList([nn.Linear(4, 3).double() for _ in range(tasks)])

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc2(torch.tanh(self.fc1(x))))


def _losses(model: TwoLayer, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[int, torch.Tensor]:
    x, y, t = batch
    feats = model.trunk(x)
    return {k: nn.functional.cross_entropy(model.heads[k](feats[t == k]), y[t == k]) for k in range(len(model.heads))
            if bool((t == k).any())}


def _reference(model: TwoLayer, batches: list, levels: dict[str, list[str]], tasks: int) -> dict[str, np.ndarray]:
    """The obvious way: each task's rows in a forward of their own, autograd per parameter, float64 vectors."""
    named = dict(model.named_parameters())
    out = {}
    for level, names in levels.items():
        per_batch = []
        for x, y, t in batches:
            row = []
            for k in range(tasks):
                loss = nn.functional.cross_entropy(model.heads[k](model.trunk(x[t == k])), y[t == k])
                g = torch.autograd.grad(loss, [named[n] for n in names])
                row.append(torch.cat([v.reshape(-1) for v in g]).numpy())
            per_batch.append(row)
        out[level] = np.array(per_batch)  # (K, T, P)
    return out


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def test_conflict_matches_direct_float64_computation() -> None:
    torch.manual_seed(0)
    tasks, k = 3, 5
    model = TwoLayer(tasks)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(k):
        t = torch.arange(tasks).repeat_interleave(4)
        batches.append((torch.randn(len(t), 5, generator=g, dtype=torch.float64),
                        torch.randint(0, 3, (len(t),), generator=g), t))
    levels = {"fc1": ["fc1.weight", "fc1.bias"], "fc2": ["fc2.weight"], ALL: ["fc1.weight", "fc1.bias",
                                                                               "fc2.weight", "fc2.bias"]}
    result = measure_conflict(model, lambda b: _losses(model, b), batches, levels, ["a", "b", "c"])
    ref = _reference(model, batches, levels, tasks)
    rows = {(r["layer"], r["task_a"], r["task_b"]): r for r in result.rows(n_boot=300, seed=7)}
    assert len(rows) == 3 * 3  # 3 levels x 3 pairs
    names = ["a", "b", "c"]
    for level, vecs in ref.items():
        mean = vecs.mean(0)
        # the bootstrap interval, recomputed from explicit vectors with the same resampling draws
        w = np.random.default_rng(7).multinomial(k, np.full(k, 1 / k), size=300)
        for a in range(tasks):
            for b in range(a + 1, tasks):
                r = rows[(level, names[a], names[b])]
                assert r["cosine"] == pytest.approx(_cos(mean[a], mean[b]), abs=1e-5)
                assert r["norm_ratio"] == pytest.approx(np.linalg.norm(mean[a]) / np.linalg.norm(mean[b]), rel=1e-5)
                per = [_cos(vecs[i, a], vecs[i, b]) for i in range(k)]
                assert r["neg_fraction"] == pytest.approx(np.mean([c < 0 for c in per]))
                boot = [_cos(wi @ vecs[:, a], wi @ vecs[:, b]) for wi in w]
                est = _cos(mean[a], mean[b])  # basic bootstrap: quantiles reflected around the estimate
                assert r["ci_low"] == pytest.approx(max(-1.0, 2 * est - np.quantile(boot, 0.975)), abs=1e-5)
                assert r["ci_high"] == pytest.approx(min(1.0, 2 * est - np.quantile(boot, 0.025)), abs=1e-5)
                assert r["n"] == k
    assert all(p.grad is None for p in model.parameters())  # the measurement leaves .grad alone


def test_negated_loss_gives_cosine_minus_one() -> None:
    torch.manual_seed(0)
    model = TwoLayer(1)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g),
                torch.zeros(6, dtype=torch.long)) for _ in range(4)]

    def losses(batch: tuple) -> dict[int, torch.Tensor]:
        loss = _losses(model, batch)[0]
        return {0: loss, 1: -loss}

    levels = {"fc1": ["fc1.weight"], ALL: ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]}
    result = measure_conflict(model, losses, batches, levels, ["plus", "minus"])
    for r in result.rows():
        assert r["cosine"] == pytest.approx(-1.0, abs=1e-9)
        assert r["neg_fraction"] == 1.0 and r["norm_ratio"] == pytest.approx(1.0)
        assert r["ci_high"] == pytest.approx(-1.0, abs=1e-9)


def _twin_scenario(n: int = 12) -> Scenario:
    """Two domains (tied head) holding the same images and labels."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    ds = ArrayTaskDataset(torch.cat([x, x]), torch.cat([y, y]), np.repeat([0, 1], n))
    tasks = [TaskInfo("d0", "classification", 4), TaskInfo("d1", "classification", 4)]
    return Scenario("twins", "domain", tasks, ds, ds, ds, (1, 8, 8), shared_head=True)


@pytest.mark.parametrize("arch", ["hps", "mola"])
def test_identical_tasks_with_tied_head_give_cosine_one(arch: str) -> None:
    torch.manual_seed(0)
    sc = _twin_scenario()
    cfg = ModelConfig(arch=arch)
    cfg.backbone.name, cfg.backbone.width = "small_cnn", 4
    model = build_model(sc, cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # 12 rows per task and batches of 24: every batch holds all of each task's (identical) rows
    result = model_conflict(model, sc, num_batches=3, batch_size=24, seed=0)
    assert "layer4.conv1" in result.levels() and "stage:layer1" in result.levels() and ALL in result.levels()
    for r in result.rows():
        assert r["cosine"] == pytest.approx(1.0, abs=1e-5), r["layer"]
        assert r["neg_fraction"] == 0.0 and r["norm_ratio"] == pytest.approx(1.0, rel=1e-5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics restored
    assert not model.training  # measured in train mode (batch statistics), handed back in eval mode


def test_levels_exclude_adapters_and_name_layers_relative_to_the_backbone() -> None:
    sc = _twin_scenario()
    cfg = ModelConfig(arch="mola")
    cfg.backbone.name, cfg.backbone.width = "small_cnn", 4
    cfg.mola.mode = "router"  # the router shares its adapters: they are still not W0
    levels = conflict_levels(build_model(sc, cfg))
    assert levels["layer4.conv1"] == ["encoder.model.layer4.conv1.base_layer.weight"]
    assert not any("lora" in n or "router" in n or "lift" in n for names in levels.values() for n in names)
    hps = conflict_levels(build_model(sc, ModelConfig(arch="hps", backbone=cfg.backbone)))
    assert [k for k in hps if k != ALL] == [k for k in levels if k != ALL]  # the same levels as MoLA's


def test_pair_statistics_edge_cases() -> None:
    gram = np.zeros((1, 2, 1, 2))
    gram[0, 0, 0, 0] = 1.0  # task b has no gradient: its cosine is undefined, not 0
    st = pair_statistics(gram)
    assert np.isnan(st["cosine"][0, 1]) and np.isnan(st["ci_low"][0, 1])
    with pytest.raises(ValueError, match="confidence"):
        pair_statistics(gram, confidence=1.5)


def test_shifted_digits_levels_are_ordered_by_measured_conflict() -> None:
    """The knob on a small budget: at init (shared head), the mean pair cosine on every shared weight falls as
    the scrambled share grows. The measurement decides the order; the test checks that it agrees with the knob."""
    root = shared_dir("digits")
    means = []
    for shift in (0.0, 0.5, 1.0):
        cfg = load_config(None, [f"data.root={root}", "data.kind=shifted_digits", f"data.shift={shift}",
                                 "data.max_per_task=96", "data.max_eval_per_task=10", "data.domains=[p0,p1,p2]",
                                 "model.arch=hps", "model.backbone.name=small_cnn", "model.backbone.width=8"])
        from mola.data import build_scenario

        sc = build_scenario(cfg.data)
        torch.manual_seed(0)
        model = build_model(sc, cfg.model)
        result = model_conflict(model, sc, num_batches=4, batch_size=96, seed=0)
        means.append(summary_columns(result, pairs=False)[f"conflict/{ALL}/mean_cosine"])
    assert means[0] > means[1] > means[2], means


def _office(tmp_path: Path, *extra: str):
    root = make_office(tmp_path / "office", "surf", {"amazon": 60, "dslr": 60, "webcam": 60})
    cfg = load_config(None, [f"data.root={root}", "data.kind=office_caltech10", "data.batch_size=32",
                             "model.backbone.name=mlp", "model.backbone.width=16", "train.epochs=2",
                             "train.max_steps_per_epoch=4", "train.progress=false", "train.tensorboard=false",
                             *extra])
    cfg.out_dir = str(tmp_path)
    return cfg


def test_log_conflict_every_records_conflict_and_leaves_training_unchanged(tmp_path: Path) -> None:
    plain = Trainer(_office(tmp_path), tmp_path / "plain")
    plain.fit()
    logged = Trainer(_office(tmp_path, "train.log_conflict_every=1", "train.conflict_batches=2"), tmp_path / "logged")
    logged.fit()
    a, b = plain.model.state_dict(), logged.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # same weights: the measurement draws from its own RNG
    with open(tmp_path / "logged" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    for r in rows:
        v = float(r[f"conflict/{ALL}/mean_cosine"])
        assert -1.0 <= v <= 1.0
        assert float(r[f"conflict/{ALL}/amazon|dslr"]) >= float(r[f"conflict/{ALL}/min_cosine"])
    with open(tmp_path / "plain" / "metrics.csv") as fh:
        assert not any(c.startswith("conflict/") for c in next(csv.reader(fh)))


def test_cli_conflict_writes_every_pair_and_level(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    root = make_office(tmp_path / "office", "surf", {"amazon": 40, "caltech": 40, "dslr": 40, "webcam": 40})
    cfg.write_text(f"data: {{kind: office_caltech10, root: {root}, batch_size: 32}}\n"
                   "model: {arch: mola, backbone: {name: mlp, width: 16}}\n")
    out = tmp_path / "cf"
    assert main(["conflict", "--config", str(cfg), "--batches", "3", "--out", str(out)]) == 0
    with open(out / "conflict.csv") as fh:
        rows = list(csv.DictReader(fh))
    levels = {r["layer"] for r in rows}
    assert ALL in levels and len(levels) >= 3
    assert len(rows) == 6 * len(levels)  # 4 domains: 6 pairs per level
    assert all(r["n"] == "3" for r in rows)
    assert all((out / f"conflict_{lv.replace(':', '_')}.png").is_file() for lv in levels)
    meta = json.loads((out / "conflict.json").read_text())
    assert meta["batches"] == 3 and meta["weights"].startswith("init")
    text = capsys.readouterr().out
    assert "most conflicting pairs" in text and "mean pair cosine" in text
    assert main(["conflict", "--config", str(cfg), "--batches", "0", "--out", str(out)]) == 2
    assert main(["conflict", "--out", str(out)]) == 2  # neither --config nor --checkpoint


def test_hps_wide_reaches_mola_grad_parameter_count_at_the_smallest_width() -> None:
    sc = _twin_scenario()
    cfg = ModelConfig(arch="hps_wide")
    cfg.backbone.name, cfg.backbone.width = "small_cnn", 4
    cfg.mola.rank = 8
    wide = build_model(sc, cfg)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    grad_cfg = ModelConfig(arch="mola", backbone=cfg.backbone, mola=cfg.mola)
    target = count(build_model(sc, grad_cfg))
    assert wide.target_params == target and count(wide) >= target
    narrower = ModelConfig(arch="hps")
    narrower.backbone.name, narrower.backbone.width = "small_cnn", wide.width - 1
    assert count(build_model(sc, narrower)) < target < count(wide)
    cfg.backbone.name = "resnet18"
    with pytest.raises(ValueError, match="no width setting"):
        build_model(sc, cfg)


@pytest.mark.parametrize("arch", ["hps", "mola"])
def test_single_input_tasks_are_measured_on_the_same_rows(tmp_path: Path, arch: str) -> None:
    """NYUv2-style data (segmentation, depth, normals on one image): every task's loss on every row."""
    from mola.data import DataConfig, build_scenario

    sc = build_scenario(DataConfig(kind="nyuv2", root=str(make_nyuv2(tmp_path / "nyu", n_train=12, n_val=4)),
                                   val_fraction=0.25))
    cfg = ModelConfig(arch=arch)
    cfg.backbone.name, cfg.backbone.width = "small_cnn", 4
    torch.manual_seed(0)
    result = model_conflict(build_model(sc, cfg), sc, num_batches=2, batch_size=4, seed=0)
    rows = result.rows(n_boot=50)
    assert {(r["task_a"], r["task_b"]) for r in rows} == {("segmentation", "depth"), ("segmentation", "normal"),
                                                         ("depth", "normal")}
    assert all(np.isfinite(r["cosine"]) and -1 <= r["cosine"] <= 1 for r in rows)


def test_shifted_digits_scramble_is_a_nested_per_domain_permutation() -> None:
    from mola.data.layouts.shifted_digits import scramble, scramble_plan

    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(scramble(x, 0.0, "p0", 0), x)
    full = scramble(x, 1.0, "p0", 0)
    assert not torch.equal(full, x)
    assert torch.equal(full.reshape(3, -1).sort(1).values, x.reshape(3, -1).sort(1).values)  # pixels only move
    assert not torch.equal(scramble(x, 1.0, "p1", 0), full)  # each domain its own permutation
    small, _ = scramble_plan(0.25, "p0", 0)
    large, _ = scramble_plan(0.5, "p0", 0)
    assert len(small) == 196 and set(small) <= set(large)  # nested levels
    with pytest.raises(ValueError, match="data.shift"):
        load_config(None, ["data.shift=1.5"])
    with pytest.raises(ValueError, match="data.shift"):
        load_config(None, ["data.shift=-0.1"])


def test_shifted_digits_domains_are_disjoint_draws() -> None:
    from mola.data import build_scenario

    cfg = load_config(None, [f"data.root={shared_dir('digits')}", "data.kind=shifted_digits", "data.shift=0",
                             "data.max_per_task=50", "data.max_eval_per_task=20"])
    sc = build_scenario(cfg.data)
    assert [t.name for t in sc.tasks] == ["p0", "p1", "p2", "p3"] and sc.shared_head
    ids = np.asarray(sc.train.task_ids)
    flat = sc.train.inputs.reshape(len(ids), -1)
    rows = {k: {tuple(r.tolist()) for r in flat[ids == k][:, ::7]} for k in range(4)}
    assert all(not (rows[a] & rows[b]) for a in range(4) for b in range(a + 1, 4))


def test_multi_input_tasks_get_balanced_batches_and_every_pair() -> None:
    """Multi-input tasks (own inputs, own heads): each batch holds rows of every task, even the rare one."""
    from mola.engine.conflict import conflict_batches

    g = torch.Generator().manual_seed(5)
    sizes = [40, 30, 3]  # a 4% task still gets its rows in every batch
    x = torch.randn(sum(sizes), 1, 8, 8, generator=g)
    y = torch.cat([torch.randint(0, k, (n,), generator=g) for k, n in zip((3, 4, 2), sizes, strict=True)])
    ids = np.repeat(np.arange(3), sizes)
    ds = ArrayTaskDataset(x, y, ids)
    tasks = [TaskInfo("a", "classification", 3), TaskInfo("b", "classification", 4), TaskInfo("c", "classification", 2)]
    sc = Scenario("three", "multi_input", tasks, ds, ds, ds, (1, 8, 8))
    batches = conflict_batches(sc, num_batches=3, batch_size=30, seed=1)
    for rows in batches:
        counts = np.bincount(ids[rows], minlength=3)
        assert counts.tolist() == [10, 10, 3] and len(set(rows)) == len(rows)
    cfg = ModelConfig(arch="mola")
    cfg.backbone.name, cfg.backbone.width = "small_cnn", 4
    result = model_conflict(build_model(sc, cfg), sc, num_batches=3, batch_size=30)
    rows = result.rows(n_boot=50)
    assert len(rows) == 3 * len(result.levels())
    assert all(np.isfinite(r["cosine"]) and r["n"] == 3 for r in rows)
    with pytest.raises(ValueError, match="at least one batch"):
        measure_conflict(TwoLayer(1), lambda b: {}, [], {ALL: ["fc1.weight"]}, ["a"])
