"""mola.analysis: spectra on constructed matrices, parameter closed forms, routing scores, plots, `mola analyze`."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mola import MoLAConfig, inject
from mola.analysis import plots
from mola.analysis.params import (
    adapter_count,
    count_vs_rank,
    expected_adapter_count,
    parameter_counts,
    single_task_total,
)
from mola.analysis.routing import (
    collect_codes,
    mean_weights_per_task,
    pca_2d,
    routing_summary,
    silhouette,
    task_inference_accuracy,
)
from mola.analysis.spectra import (
    delta_rank_bound,
    layer_singular_values,
    layer_spectra,
    numerical_rank,
    pc_proportion,
    pc_stats,
    singular_values,
)
from mola.data.base import ArrayTaskDataset, Scenario, TaskInfo


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models: torch's intra-op threads only add overhead (seconds per step on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- spectra ------------------------------------------------------------------------------------------------


def test_pc_proportion_constructed_matrices() -> None:
    g = torch.Generator().manual_seed(0)
    low = torch.randn(7, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 5, generator=g, dtype=torch.float64)
    st = pc_stats(low, eps=0.999999)
    assert (st["rank"], st["kstar"], st["proportion"]) == (2, 2, 1.0)  # n = rank 2, not min(7, 5)
    assert numerical_rank(low) == 2
    assert pc_proportion(torch.eye(6)) == 1.0
    assert pc_proportion(torch.eye(6), eps=1.0) == 1.0
    # singular values 5, 3, 1, 1 (sum 10): cumulative shares .5, .8, .9, 1
    diag = torch.diag(torch.tensor([1.0, 5.0, 1.0, 3.0], dtype=torch.float64))
    assert torch.allclose(singular_values(diag), torch.tensor([5.0, 3.0, 1.0, 1.0], dtype=torch.float64))
    assert pc_stats(diag, 0.5)["kstar"] == 1
    assert pc_stats(diag, 0.8) == {"kstar": 2, "rank": 4, "proportion": 0.5}
    assert pc_stats(diag, 0.85)["kstar"] == 3
    assert pc_proportion(diag, 0.99) == 1.0
    # a conv kernel is flattened to Co x Ci*k*k; a zero weight has no spectrum
    assert pc_stats(torch.zeros(4, 2, 3, 3))["rank"] == 0 and math.isnan(pc_proportion(torch.zeros(3, 3)))
    k = torch.zeros(4, 2, 3, 3)
    k[0, 0, 0, 0], k[1, 1, 2, 2] = 2.0, 2.0
    assert pc_stats(k, 0.99) == {"kstar": 2, "rank": 2, "proportion": 1.0}
    with pytest.raises(ValueError, match="eps"):
        pc_proportion(diag, 0.0)


def test_singular_values_gram_path_matches_svd() -> None:
    g = torch.Generator().manual_seed(1)
    low = (torch.randn(100, 5, generator=g) @ torch.randn(5, 300, generator=g)).float()  # float32, >= 64 x 64
    ref = torch.linalg.svdvals(low.double())
    s = singular_values(low)
    assert s.shape == (100,) and torch.allclose(s[:5], ref[:5], rtol=1e-6)
    assert numerical_rank(low) == 5 and numerical_rank(low.T.contiguous()) == 5
    assert pc_stats(low, 1.0) == {"kstar": 5, "rank": 5, "proportion": 1.0}
    assert numerical_rank(torch.randn(80, 70, generator=g)) == 70


class _Net(nn.Module):
    def __init__(self, co: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, co, 3, padding=1)
        self.point = nn.Conv2d(co, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.point(self.conv(x)).mean((2, 3)))


def _randomize_b(model: nn.Module) -> None:
    with torch.no_grad():
        for layer in model.mola_layers().values():
            layer.lora_B.normal_(0.0, 0.05)


@pytest.mark.parametrize("layout", ["kernel", "factorized"])
def test_layer_spectra_ranks_and_note(layout: str) -> None:
    torch.manual_seed(0)
    m = inject(_Net(co=32), MoLAConfig(num_experts=3, rank=1, layout=layout, target_modules=["conv", "point", "fc"]))
    fresh = layer_spectra(m)
    assert all(r[f"e{e}_delta_rank"] == 0 for r in fresh for e in range(3))  # B = 0: W0 + s*dW_e = W0
    assert all(r["w0_pc"] == r["e0_pc"] for r in fresh)
    _randomize_b(m)
    rows = {r["layer"]: r for r in layer_spectra(m)}
    assert set(rows) == {"conv", "point", "fc"}
    conv = rows["conv"]
    assert conv["shape"] == "32x8x3x3" and conv["w0_rank"] == 32
    if layout == "kernel":
        # reshape(B A) of a 3x3 kernel as a 32 x 72 matrix: rank up to r*k^2 = 9 (not r = 1), and reached
        assert conv["delta_rank_bound"] == 9 and conv["e0_delta_rank"] == 9
        assert "r*k^2 = 9" in conv["note"]
    else:
        assert conv["delta_rank_bound"] == 1 and conv["e0_delta_rank"] == 1
    assert rows["point"]["e1_delta_rank"] == 1 and rows["fc"]["e2_delta_rank"] == 1  # 1x1 and Linear: rank <= r
    layer = m.mola_layers()["conv"]
    assert delta_rank_bound(layer) == conv["delta_rank_bound"]
    merged = layer.merged_weight(2).detach()
    assert conv["e2_pc"] == pc_proportion(merged)
    sv = layer_singular_values(m, (0, 1))
    assert list(sv["conv"]) == ["W0", "W0+s*dW0", "W0+s*dW1"]
    assert sv["conv"]["W0"].shape == (32,) and bool((sv["conv"]["W0"][:-1] >= sv["conv"]["W0"][1:]).all())
    with pytest.raises(ValueError, match="no MoLA layers"):
        layer_spectra(_Net())


# -- parameter counts ---------------------------------------------------------------------------------------


def test_parameter_closed_forms() -> None:
    e, r = 3, 4
    conv = nn.Conv2d(8, 16, 3)
    assert adapter_count(conv, e, r, "kernel") == e * r * 9 * (8 + 16)
    assert adapter_count(conv, e, r, "factorized") == e * r * (8 * 9 + 16)
    assert adapter_count(nn.Linear(10, 6), e, r) == e * r * (10 + 6)
    names = ["conv", "point", "fc"]
    for layout in ("kernel", "factorized"):
        plain = _Net()
        expect = expected_adapter_count(plain, names, e, r, layout)
        m = inject(_Net(), MoLAConfig(num_experts=e, rank=r, layout=layout, target_modules=names))
        counts = parameter_counts(m)
        assert counts["adapters"] == expect
        assert counts["backbone"] == sum(p.numel() for p in plain.parameters())
        assert counts["total"] == counts["backbone"] + expect and counts["router"] == counts["lift"] == 0
    # kernel layout, square kernels: E*r*k^2*(Ci+Co) per conv, E*r*(Ci+Co) per linear
    assert expected_adapter_count(_Net(), names, e, r) == e * r * (9 * (8 + 16) + (16 + 8) + (8 + 4))


def test_count_vs_rank_and_single_task_line() -> None:
    def build(rank: int) -> nn.Module:
        return inject(_Net(), MoLAConfig(num_experts=2, rank=rank, mode="router", target_modules=["conv"],
                                         router_input_size=8))

    rows = count_vs_rank(build, (1, 4, 8, 16, 64))
    assert [r["rank"] for r in rows] == [1, 4, 8, 16]  # 64 > min(16 out, 8*3*3 in) channels: no such model
    per_rank = 2 * 9 * (8 + 16)
    assert [r["adapters"] for r in rows] == [per_rank * k for k in (1, 4, 8, 16)]
    assert len({r["backbone"] for r in rows}) == 1 and len({r["router"] for r in rows}) == 1
    assert rows[0]["router"] > 0 and rows[0]["lift"] == 2 * 32 + 32
    counts = {"backbone": 100, "adapters": 7, "heads": 30, "total": 137}
    assert single_task_total(counts, 3) == 3 * 100 + 30  # three per-task heads already counted
    assert single_task_total(counts, 3, shared_head=True) == 3 * (100 + 30)


# -- routing ------------------------------------------------------------------------------------------------


def test_task_inference_separable_and_identical_codes() -> None:
    rng = np.random.default_rng(0)
    t, per = 4, 25
    tasks = np.repeat(np.arange(t), per)
    centers = rng.normal(size=(t, 8)) * 5
    z_train = centers[tasks] + rng.normal(scale=0.1, size=(t * per, 8))
    z_eval = centers[tasks] + rng.normal(scale=0.1, size=(t * per, 8))
    assert task_inference_accuracy(z_train, tasks, z_eval, tasks, t) == 1.0
    assert silhouette(z_eval, tasks) > 0.9
    same = np.ones((t * per, 8))
    assert task_inference_accuracy(same, tasks, same, tasks, t) == pytest.approx(1.0 / t)  # chance level
    assert silhouette(same, tasks) == pytest.approx(0.0)
    assert math.isnan(silhouette(z_eval, np.zeros(t * per, dtype=int)))
    w = np.eye(t)[tasks] * 0.5 + 0.5 / t
    mw = mean_weights_per_task(w, tasks, t + 1)
    assert np.allclose(mw[:t], np.eye(t) * 0.5 + 0.5 / t) and np.isnan(mw[t]).all()
    proj, ratio = pca_2d(z_eval)
    assert proj.shape == (t * per, 2) and 0.0 < sum(ratio) <= 1.0 + 1e-9
    summary = routing_summary({"z": z_train, "task_ids": tasks, "weights": w},
                              {"z": z_eval, "task_ids": tasks, "weights": w}, t)
    assert summary["task_inference_accuracy"] == 1.0 and summary["chance_accuracy"] == pytest.approx(0.25)
    single = routing_summary({"z": z_train, "task_ids": -np.ones_like(tasks), "weights": w},
                             {"z": z_eval, "task_ids": -np.ones_like(tasks), "weights": w}, t)
    assert single["per_task"] is False and "mean_weights" not in single


def test_collect_codes_router_model() -> None:
    torch.manual_seed(0)
    m = inject(_Net(), MoLAConfig(num_experts=3, rank=2, mode="router", target_modules=["conv"], router_input_size=8))
    x = torch.randn(10, 8, 6, 6)
    t = torch.arange(10) % 3
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(10), t), batch_size=4)
    m.train()
    codes = collect_codes(m, loader)
    assert m.training  # mode restored
    assert codes["weights"].shape == (10, 3) and codes["z"].shape == (10, 32) and list(codes["task_ids"]) == t.tolist()
    assert np.allclose(codes["weights"].sum(1), 1.0, atol=1e-5)
    assert collect_codes(m, loader, max_samples=5)["z"].shape == (5, 32)
    grad = inject(_Net(), MoLAConfig(num_experts=3, target_modules=["conv"]))
    with pytest.raises(ValueError, match="MoLA-Router"):
        collect_codes(grad, loader)


def test_plots_write_pngs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = inject(_Net(), MoLAConfig(num_experts=2, rank=2, target_modules=["conv", "point", "fc"]))
    _randomize_b(m)
    rows = layer_spectra(m)
    files = [
        plots.plot_singular_values(layer_singular_values(m), tmp_path / "sv.png"),
        plots.plot_pc_proportions(rows, tmp_path / "pc.png"),
        plots.plot_params_vs_rank([{"rank": r, "backbone": 100, "adapters": 10 * r, "heads": 5,
                                    "total": 105 + 10 * r} for r in (1, 4, 16)], tmp_path / "p.png", 250, 4),
        plots.plot_router_heatmap([[0.7, 0.3], [0.2, None]], ["a", "b"], tmp_path / "h.png"),
        plots.plot_codes(np.random.default_rng(0).normal(size=(20, 2)), np.arange(20) % 2, ["a", "b"],
                         tmp_path / "z.png"),
    ]
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- analyze on tiny saved runs --------------------------------------------------------------------------------


def _scenario(shape: tuple[int, ...], num_tasks: int = 3, n: int = 36) -> Scenario:
    g = torch.Generator().manual_seed(0)

    def ds(k: int) -> ArrayTaskDataset:
        t = torch.arange(k) % num_tasks
        x = torch.randn(k, *shape, generator=g) * 0.3 + t.view(-1, *[1] * len(shape)).float()
        return ArrayTaskDataset(x, (torch.rand(k, generator=g) > 0.5).long(), t)

    return Scenario("syn", "multi_input", [TaskInfo(f"task{i}", num_classes=2) for i in range(num_tasks)],
                    ds(n), ds(n // 2), ds(n // 2), shape)


RUNS = {  # name -> (input shape, overrides)
    "grad": ((3, 8, 8), ["model.backbone.name=small_cnn", "model.backbone.width=4", "model.mola.mode=grad"]),
    "router": ((1, 6, 6), ["model.backbone.name=mlp", "model.backbone.width=2", "model.mola.mode=router"]),
    "hps": ((1, 6, 6), ["model.backbone.name=mlp", "model.backbone.width=2", "model.arch=hps"]),
    "hps_cnn": ((3, 8, 8), ["model.backbone.name=small_cnn", "model.backbone.width=4", "model.arch=hps"]),
}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory, _one_thread: None) -> dict[str, tuple[Path, Scenario]]:
    try:
        from mola.engine import Trainer, load_config
    except ImportError as err:
        pytest.skip(f"the engine is not importable yet ({err}); analyze needs a saved run")
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, (shape, over) in RUNS.items():
        cfg = load_config(None, over + ["train.epochs=1", "train.progress=false", "train.tensorboard=false",
                                        "data.batch_size=12", "train.device=cpu", "data.eval_batch_size=64"])
        scen = _scenario(shape)
        Trainer(cfg, root / name, scenario=scen).fit()
        out[name] = (root / name, scen)
    return out


def test_analyze_router_grad_and_plain_runs(tiny_runs: dict[str, tuple[Path, Scenario]]) -> None:
    from mola.analysis.run import analyze_run, format_summary

    run, scen = tiny_runs["router"]
    s = analyze_run(run, scenario=scen, ranks=(1, 4))
    a = run / "analysis"
    for f in ("spectra.csv", "params.json", "routing.json", "singular_values.png", "pc_proportion.png",
              "params_vs_rank.png", "router_weights.png", "router_codes.png"):
        assert (a / f).is_file(), f
    routing = json.loads((a / "routing.json").read_text())
    assert np.array(routing["mean_weights"]).shape == (3, 3) and routing["split"] == "val"
    assert 0.0 <= routing["task_inference_accuracy"] <= 1.0
    params = json.loads((a / "params.json").read_text())
    assert params["counts"]["router"] > 0 and [r["rank"] for r in params["count_vs_rank"]] == [1, 4]
    assert params["single_task_total"] > 0
    with open(a / "spectra.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {"layer", "w0_pc", "e0_pc", "e2_delta_rank", "note"} <= set(rows[0])
    assert "routing (val)" in format_summary(s)

    run, scen = tiny_runs["grad"]
    s = analyze_run(run, checkpoint="last", scenario=scen, ranks=(1, 4))
    assert (run / "analysis" / "spectra.csv").is_file() and not (run / "analysis" / "routing.json").exists()
    with open(run / "analysis" / "spectra.csv") as fh:
        notes = [r["note"] for r in csv.DictReader(fh)]
    assert any("r*k^2" in n for n in notes)  # 3x3 kernels in the kernel layout
    # the single-task reference equals a built single_task model: T*(backbone + head)
    p = s["params"]
    assert p["single_task_total"] == single_task_total(p["counts"], 3)

    run, scen = tiny_runs["hps"]
    s = analyze_run(run, scenario=scen)
    assert sorted(p.name for p in (run / "analysis").iterdir()) == ["params.json", "singular_values.png",
                                                                  "spectra.csv"]
    assert s["spectra"]["plain"] and "routing" not in s
    with open(run / "analysis" / "spectra.csv") as fh:
        plain = list(csv.DictReader(fh))
    assert plain and all(not r["layer"].startswith("heads") for r in plain) and {"w_pc", "w_rank"} <= set(plain[0])
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        analyze_run(run.parent / "missing")


def test_analyze_cli(tiny_runs: dict[str, tuple[Path, Scenario]], monkeypatch: pytest.MonkeyPatch,
                     capsys: pytest.CaptureFixture[str]) -> None:
    import mola.engine.run as run_mod
    from mola.cli.main import main

    run, scen = tiny_runs["router"]
    monkeypatch.setattr(run_mod, "_scenario", lambda cfg, where, overrides: scen)  # the run's data is synthetic
    out = run.parent / "cli_analysis"
    assert main(["analyze", str(run), "--split", "test", "--eps", "0.9", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "task inference" in text and "routing (test)" in text
    assert json.loads((out / "routing.json").read_text())["split"] == "test"
    assert main(["analyze", str(run.parent / "nope")]) == 2


def test_plain_spectra_and_layer_matching() -> None:
    from mola.analysis.compare import match_layer, plain_layer_spectra, plain_weights

    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    with torch.no_grad():  # a rank-2 weight: k* = 2 of n = 2 -> proportion 1; identity-like 6x6 block: n = 6
        net[2].weight.copy_(torch.randn(5, 2, generator=g) @ torch.randn(2, 8, generator=g))
        net[0].weight.zero_()
        net[0].weight[:6, :6] = torch.eye(6)
    rows = {r["layer"]: r for r in plain_layer_spectra(net, eps=0.999)}
    assert rows["2"]["w_rank"] == 2 and rows["2"]["w_kstar"] == 2
    assert rows["0"]["w_rank"] == 6 and rows["0"]["w_kstar"] == 6 and rows["0"]["w_pc"] == 1.0
    wrapped = inject(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)),
                     MoLAConfig(num_experts=2, rank=1, target_modules=["2"]))
    names = list(plain_weights(wrapped))
    assert sum(n.endswith("2") or ".2." in n for n in names) == 1  # the MoLA layer counts once (its W0)
    assert match_layer("layer4.conv1", ["encoder.layer4.conv1", "x.encoder.layer4.conv1", "layer4.conv10"]) == \
        "encoder.layer4.conv1"
    assert match_layer("layer4.conv1", ["encoder.layer4.conv10"]) is None


def test_compare_spectra_reference_equals_copied_weights() -> None:
    from mola.analysis.compare import compare_spectra

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    plain = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    plain.load_state_dict(base.state_dict())
    model = inject(base, MoLAConfig(num_experts=2, rank=2, target_modules=["2"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora" in n:
                p.normal_()
    rows, svals = compare_spectra(model, {"plain": plain}, eps=0.99)
    (row,) = rows
    assert row["plain:W pc"] == row["W0 pc"] and row["plain:W rank"] == row["W0 rank"] == 5
    assert torch.equal(svals[row["layer"]]["plain:W"], svals[row["layer"]]["W0"])
    assert not torch.equal(svals[row["layer"]]["W0+s*dW0"], svals[row["layer"]]["W0"])
    wrong = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 7))
    with pytest.raises(ValueError, match="weight shape"):
        compare_spectra(model, {"wrong": wrong})
    with pytest.raises(ValueError, match="no MoLA layers"):
        compare_spectra(plain, {"plain": plain})


def test_analyze_compare_runs(tiny_runs: dict[str, tuple[Path, Scenario]]) -> None:
    from mola.analysis.run import analyze_run, format_summary

    run, scen = tiny_runs["grad"]
    ref, ref_scen = tiny_runs["hps_cnn"]
    s = analyze_run(run, scenario=scen, ranks=(1,), compare=(ref,), compare_scenarios=(ref_scen,),
                    out_dir=run.parent / "cmp")
    assert (run.parent / "cmp" / "compare_singular_values.png").is_file()
    with open(run.parent / "cmp" / "compare_spectra.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(r["hps_cnn:W pc"] != "" for r in rows)
    assert "pc proportion" in format_summary(s)
    with pytest.raises(ValueError, match="needs a MoLA run"):
        analyze_run(ref, scenario=ref_scen, compare=(run,), compare_scenarios=(scen,), out_dir=run.parent / "x")
