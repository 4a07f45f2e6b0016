"""Deployment exports: merged plain models (torch, pt2, TorchScript, safetensors) and peft LoRA adapters.

References: the MoLA model itself with its routing forced to one task (``model(x, task_ids=t)`` in grad mode,
``model(x, weights=onehot(t))`` in router mode) and, for float64, MoLA's per-sample reference path; peft's own
LoRA layers for the adapter round trip.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mola
from mola.data.base import Scenario, TaskInfo
from mola.export import (
    base_model,
    export_merged,
    export_peft,
    peft_adapter,
    reference_forward,
    resolve_task,
    save_merged,
)
from mola.inject import MoLAModel
from mola.layers import Lift, MoLALayer, Router
from mola.models import ModelConfig, build_model
from mola.models.backbones import BackboneConfig


def tiny_net(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 4))
    return net.to(dtype)


def tiny_mola(layout: str, mode: str = "grad", dtype: torch.dtype = torch.float32, compute: str = "auto",
              rank: int | dict[str, int] = 2) -> MoLAModel:
    mm = mola.inject(tiny_net(dtype), mola.MoLAConfig(mode=mode, num_experts=3, layout=layout, rank=rank, alpha=6.0,
                                                      compute=compute, target_modules=["0", "3", "6"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in mm.mola_layers().values():
            layer.lora_B.copy_(0.5 * torch.randn(layer.lora_B.shape, generator=gen, dtype=dtype))
        bn = mm.model[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return mm.to(dtype).eval()


def no_mola_modules(module: nn.Module) -> bool:
    return not any(isinstance(m, (MoLALayer, MoLAModel, Router, Lift)) for m in module.modules())


@pytest.mark.parametrize("mode", ["grad", "router"])
@pytest.mark.parametrize("layout", ["kernel", "factorized"])
def test_merged_equals_mola_float32(layout: str, mode: str) -> None:
    mm = tiny_mola(layout, mode)
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = base_model(mm)(x)
        for t in range(3):
            merged = export_merged(mm, t)
            assert no_mola_modules(merged)
            ref = reference_forward(mm, x, t)
            if mode == "grad":
                torch.testing.assert_close(ref, mm(x, task_ids=torch.full((5,), t)), rtol=0, atol=0)
            out = merged(x)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
            assert (ref - base).abs().max() > 1e-2  # the adapter changes the output: the check is not vacuous
    assert any(isinstance(m, MoLALayer) for m in mm.modules())  # the MoLA model is left unchanged


@pytest.mark.parametrize("layout", ["kernel", "factorized"])
def test_merged_equals_per_sample_reference_float64(layout: str) -> None:
    mm = tiny_mola(layout, "grad", torch.float64, compute="reference")
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for t in range(3):
            ref = mm(x, task_ids=torch.full((4,), t))  # MoLA's slow per-sample oracle path
            torch.testing.assert_close(export_merged(mm, t)(x), ref, rtol=0, atol=1e-10)


def tiny_scenario(heterogeneity: str = "multi_input") -> Scenario:
    tasks = [TaskInfo("alpha", "classification", 3), TaskInfo("beta", "classification", 5)]
    return Scenario("tiny", heterogeneity, tasks, None, None, None, (1, 12, 12))  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["grad", "router"])
def test_merged_multitask_model_equals_task_output(mode: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=BackboneConfig(name="small_cnn", width=4),
                      mola=mola.MoLAConfig(mode=mode, layout="factorized", rank=2))
    model = build_model(tiny_scenario(), cfg).eval()
    with torch.no_grad():
        for layer in model.encoder.mola_layers().values():
            layer.lora_B.normal_()
    x = torch.randn(3, 1, 12, 12)
    for t, name in enumerate(["alpha", "beta"]):
        merged = export_merged(model, name)
        assert no_mola_modules(merged)
        with torch.no_grad():
            if mode == "grad":
                ref = model(x, torch.full((3,), t))[t]  # the architecture's own forward with task ids t
            else:
                ref = reference_forward(model, x, t)
            out = merged(x)
        assert out.shape == (3, [3, 5][t])
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_router_with_more_experts_than_tasks_needs_weights() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=BackboneConfig(name="small_cnn", width=4),
                      mola=mola.MoLAConfig(mode="router", num_experts=3, rank=2))
    model = build_model(tiny_scenario(), cfg).eval()
    with pytest.raises(ValueError, match="3 adapters for 2 tasks"):
        export_merged(model, "beta")
    w = torch.tensor([0.5, 0.25, 0.25])
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(export_merged(model, "beta", w)(x), reference_forward(model, x, 1, w),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", ["pt2", "torchscript", "safetensors"])
def test_saved_formats_reload_without_mola_classes(tmp_path: Path, fmt: str) -> None:
    mm = tiny_mola("factorized")
    merged = export_merged(mm, 1)
    x = torch.randn(2, 3, 8, 8)
    path = save_merged(merged, x, tmp_path / f"m.{fmt}", fmt)
    xs = torch.randn(5, 3, 8, 8)  # another batch size than the example: the batch dimension is dynamic
    with torch.no_grad():
        ref = mm(xs, task_ids=torch.full((5,), 1))
        if fmt == "pt2":
            loaded = torch.export.load(str(path)).module()
        elif fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = torch.jit.load(str(path))
        else:
            from safetensors.torch import load_file

            loaded = tiny_net()
            loaded.load_state_dict(load_file(str(path)))
            loaded.eval()
        if fmt != "torchscript":
            assert all(not type(m).__module__.startswith("mola") for m in loaded.modules())
        torch.testing.assert_close(loaded(xs), ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="unknown export format 'onnx'"):
        save_merged(merged, x, tmp_path / "m.onnx", "onnx")


def test_resolve_task_errors_list_valid_names() -> None:
    assert resolve_task("beta", ["alpha", "beta"]) == 1 and resolve_task("0", ["alpha", "beta"]) == 0
    with pytest.raises(ValueError, match="unknown task 'gamma'; valid tasks: alpha, beta"):
        resolve_task("gamma", ["alpha", "beta"])
    with pytest.raises(ValueError, match=r"out of range \[0, 2\)"):
        resolve_task(2, ["alpha", "beta"])


def test_peft_adapter_files_keys_and_shapes(tmp_path: Path) -> None:
    mm = tiny_mola("factorized", rank={"0": 3, "*": 2})
    out = export_peft(mm, 2, tmp_path / "t2")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["lora_alpha"] == 6.0 and cfg["use_rslora"] is False
    assert cfg["rank_pattern"] == {"^0": 3}
    from safetensors.torch import load_file

    state = load_file(str(out / "adapter_model.safetensors"))
    conv0 = mm.model[0]
    assert state["base_model.model.0.lora_A.weight"].shape == (3, 3, 3, 3)  # (r, Ci, kh, kw)
    assert state["base_model.model.3.lora_B.weight"].shape == (5, 2, 1, 1)  # (Co, r, 1, 1)
    assert state["base_model.model.6.lora_A.weight"].shape == (2, 80)
    # the conv factors rebuild the layer's dW_2 (method.md §2) exactly
    a, b = state["base_model.model.0.lora_A.weight"], state["base_model.model.0.lora_B.weight"]
    dw = (b.flatten(1) @ a.flatten(1)).view_as(conv0.weight)
    torch.testing.assert_close(dw, conv0.delta_weights(torch.tensor([2]))[0].detach(), rtol=0, atol=1e-6)
    assert len(state) == 6


def test_peft_refuses_layers_it_cannot_express() -> None:
    with pytest.raises(ValueError, match=r"'0' cannot be written as a peft LoRA adapter: layout='kernel' with a 3x3"):
        peft_adapter(tiny_mola("kernel"), 0)
    mm = mola.inject(nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, dilation=2)),
                     mola.MoLAConfig(num_experts=2, layout="factorized", target_modules=["0"]))
    with pytest.raises(ValueError, match="dilation"):
        peft_adapter(mm, 0)
    # kernel layout is a plain LoRA product for Linear and 1x1 convs
    kernel_ok = mola.inject(tiny_net(), mola.MoLAConfig(num_experts=2, target_modules=["3", "6"]))
    assert len(peft_adapter(kernel_ok, 1)[1]) == 4


@pytest.mark.parametrize("layout,targets", [("factorized", ["0", "3", "6"]), ("kernel", ["3", "6"])])
def test_peft_round_trip_equals_mola(tmp_path: Path, layout: str, targets: list[str]) -> None:
    peft = pytest.importorskip("peft")
    mm = mola.inject(tiny_net(), mola.MoLAConfig(num_experts=3, layout=layout, rank={"0": 3, "*": 2}, alpha=6.0,
                                                 target_modules=targets))
    with torch.no_grad():
        for layer in mm.mola_layers().values():
            layer.lora_B.normal_()
    mm.eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = base_model(mm)(x)
        for t in range(3):
            export_peft(mm, t, tmp_path / f"t{t}")
            pm = peft.PeftModel.from_pretrained(base_model(mm), str(tmp_path / f"t{t}")).eval()
            loaded = [n for n, m in pm.named_modules() if n.endswith("lora_A")]
            assert len(loaded) == len(targets)  # peft wrapped exactly the MoLA layers
            ref = mm(x, task_ids=torch.full((4,), t))
            torch.testing.assert_close(pm(x), ref, rtol=0, atol=1e-5)
            assert (ref - plain).abs().max() > 1e-2
            # independent of the json: peft's own LoraConfig + set_peft_model_state_dict gives the same model
            cfg = json.loads((tmp_path / f"t{t}" / "adapter_config.json").read_text())
            lc = peft.LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=targets,
                                 rank_pattern=cfg["rank_pattern"], init_lora_weights=False)
            pm2 = peft.get_peft_model(base_model(mm), lc)
            from safetensors.torch import load_file

            res = peft.set_peft_model_state_dict(pm2, load_file(str(tmp_path / f"t{t}" / "adapter_model.safetensors")))
            assert not res.unexpected_keys
            torch.testing.assert_close(pm2.eval()(x), ref, rtol=0, atol=1e-5)


def test_mixture_merge_and_peft_equal_mola_with_those_weights(tmp_path: Path) -> None:
    mm = tiny_mola("factorized", "router", rank={"0": 3, "*": 2})
    w = torch.tensor([0.2, 0.7, 0.1])
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = mm(x, weights=w.expand(4, 3).contiguous())  # every sample mixed with w
        torch.testing.assert_close(reference_forward(mm, x, 0, w), ref, rtol=0, atol=0)
        torch.testing.assert_close(export_merged(mm, 0, w)(x), ref, rtol=0, atol=1e-5)
    cfg, state = peft_adapter(mm, 0, w)
    assert cfg["r"] == 6 and cfg["rank_pattern"] == {"^0": 9} and cfg["lora_alpha"] == 18.0  # E*r, E*alpha
    assert state["base_model.model.0.lora_A.weight"].shape == (9, 3, 3, 3)
    peft = pytest.importorskip("peft")
    export_peft(mm, 0, tmp_path / "mix", w)
    pm = peft.PeftModel.from_pretrained(base_model(mm), str(tmp_path / "mix")).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(x), ref, rtol=0, atol=1e-5)


def test_cli_export_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fixtures_runs import train_tiny_run
    from mola.cli.main import main

    run = train_tiny_run(tmp_path, "mola_router", layout="factorized")
    out = tmp_path / "exp"
    assert main(["export", "--checkpoint", str(run), "--task", "bright", "--out", str(out), "--peft"]) == 0
    info = json.loads((out / "export.json").read_text())
    assert info["task"] == "bright" and info["max_abs_error_vs_mola"] < 1e-5
    stored = json.loads((run / "task_centroids.json").read_text())["mean_weights"]
    assert info["mixing"]["kind"] == "task-mean" and info["mixing"]["weights"] == pytest.approx(stored[0])
    assert sum(info["mixing"]["weights"]) == pytest.approx(1.0)
    assert 0 <= info["vs_router_model"]["argmax_agreement"] <= 1
    assert json.loads((out / "peft" / "dark" / "adapter_config.json").read_text())["r"] == 2 * 4  # E*r
    assert sorted(p.name for p in (out / "peft").iterdir()) == ["base_model.safetensors", "bright", "dark",
                                                                 "heads.safetensors"]
    module = torch.export.load(str(out / "model.pt2")).module()
    x = torch.randn(3, 1, 28, 28)
    assert module(x).shape == (3, 3)
    assert F.softmax(module(x), -1).sum(-1).allclose(torch.ones(3))
    assert main(["export", "--checkpoint", str(run), "--task", "nope", "--out", str(out)]) == 2
    assert "valid tasks: bright, dark" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(run), "--task", "1", "--mixing", "expert", "--format", "safetensors",
                 "--out", str(tmp_path / "e")]) == 0
    info = json.loads((tmp_path / "e" / "export.json").read_text())
    assert info["mixing"]["weights"] is None and info["task"] == "dark" and info["max_abs_error_vs_mola"] < 1e-5
    assert (tmp_path / "e" / "model.safetensors").is_file()
