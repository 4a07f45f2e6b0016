"""inject(): target selection, identity at init, gradient separation, errors, counts, save/load, merge."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import mola
from mola import MoLAConfig
from mola.layers import MoLAConv2d, MoLALayer, MoLALinear

DT = torch.float64
TOL = {"rtol": 0.0, "atol": 1e-10}


def resnet(num_classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=num_classes).eval()


def vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    ).eval()
    with torch.no_grad():  # torchvision zero-initialises the head, which would make every output equal
        model.heads.head.weight.normal_()
    return model


def randomize_b(model: mola.MoLAModel, std: float = 1.0, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.mola_layers().values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen, dtype=layer.lora_B.dtype) * std)


def mola_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, MoLALayer)]


def conv_names(model: nn.Module, prefixes: tuple[str, ...]) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.startswith(prefixes)]


# -- presets and patterns -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "preset,stages",
    [("last_stage", ("layer4.",)), ("all_stages", ("layer1.", "layer2.", "layer3.", "layer4.")),
     ("stages:2,4", ("layer2.", "layer4."))],
)
def test_resnet_presets(preset, stages):
    model = resnet()
    expected = conv_names(model, stages)
    mm = mola.inject(model, MoLAConfig(num_experts=3, target_modules=preset))
    assert mm.layer_names == expected
    assert mola_names(mm.model) == expected
    assert "conv1" not in expected and "fc" not in expected
    if "layer4." in stages:
        assert "layer4.0.downsample.0" in expected
    assert all(isinstance(mm.model.get_submodule(n), MoLAConv2d) for n in expected)
    assert isinstance(mm.model.conv1, nn.Conv2d) and not isinstance(mm.model.conv1, MoLALayer)


def test_resnet_last_stage_names_explicitly():
    mm = mola.inject(resnet(), MoLAConfig(num_experts=2))  # default preset: last_stage
    assert mm.layer_names == [
        "layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv1", "layer4.1.conv2",
    ]


@pytest.mark.parametrize("preset,blocks", [("last_stage", [3]), ("all_stages", [0, 1, 2, 3]),
                                           ("stages:1,3", [0, 2])])
def test_vit_presets_select_mlp_linears(preset, blocks):
    model = vit()
    mm = mola.inject(model, MoLAConfig(num_experts=2, target_modules=preset))
    expected = [f"encoder.layers.encoder_layer_{i}.mlp.{j}" for i in blocks for j in (0, 3)]
    assert mm.layer_names == expected
    assert all(isinstance(mm.model.get_submodule(n), MoLALinear) for n in expected)
    assert not any("out_proj" in n for n in mola_names(mm.model))
    assert not isinstance(mm.model.heads.head, MoLALayer)


def test_vit_injected_runs_and_equals_original():
    model = vit()
    orig = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32)
    mm = mola.inject(model, MoLAConfig(num_experts=2, target_modules="all_stages"))
    with torch.no_grad():
        ref = orig(x)
        assert torch.equal(mm(x, task_ids=torch.tensor([1, 0, 0, 1])), ref)
        assert torch.equal(mm(x, task_ids=torch.tensor([1, 1, 1, 1])), ref)
        randomize_b(mm)
        out = mm(x, task_ids=torch.tensor([1, 0, 0, 1]))
    assert out.shape == (4, 5) and torch.isfinite(out).all()
    assert not torch.allclose(out, ref)


def test_vit_router_mode_equals_original():
    model = vit()
    orig = copy.deepcopy(model)
    mm = mola.inject(model, MoLAConfig(mode="router", num_experts=3, router_input_size=16)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(mm(x), orig(x))
    assert mm.router.in_channels == 3  # read from conv_proj


def test_patterns_exact_suffix_regex():
    def names(targets):
        return mola.inject(resnet(), MoLAConfig(num_experts=2, target_modules=targets)).layer_names

    assert names(["layer4.0.conv1"]) == ["layer4.0.conv1"]
    assert names(["downsample.0"]) == [f"layer{i}.0.downsample.0" for i in (2, 3, 4)]
    assert names(["layer3.1.conv2", "layer2.0.conv1"]) == ["layer2.0.conv1", "layer3.1.conv2"]  # model order
    assert names([r"re:layer[23]\.\d\.conv1"]) == ["layer2.0.conv1", "layer2.1.conv1", "layer3.0.conv1",
                                                   "layer3.1.conv1"]
    # a suffix matches whole name components only; the stem conv1 is wrapped only when named
    assert names(["conv1"]) == ["conv1"] + [f"layer{i}.{j}.conv1" for i in range(1, 5) for j in (0, 1)]
    assert names(["fc"]) == ["fc"]


def test_rank_dict_per_module():
    mm = mola.inject(resnet(), MoLAConfig(num_experts=3, rank={"layer4.0.conv1": 2, "*": 4}))
    layers = mm.mola_layers()
    assert layers["layer4.0.conv1"].rank == 2
    assert layers["layer4.0.conv1"].lora_A.shape == (3, 2 * 3, 256 * 3)
    assert all(layer.rank == 4 for n, layer in layers.items() if n != "layer4.0.conv1")
    assert layers["layer4.1.conv1"].lora_A.shape == (3, 4 * 3, 512 * 3)
    assert layers["layer4.0.conv1"].scaling == 16.0 / 2


# -- identity at init -----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["kernel", "factorized"])
def test_fresh_model_equals_original_grad_mode(layout):
    model = resnet()
    orig = copy.deepcopy(model)
    mm = mola.inject(model, MoLAConfig(num_experts=3, layout=layout, target_modules="all_stages"))
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        ref = orig(x)
        assert torch.equal(mm(x, task_ids=torch.tensor([2, 0, 2, 0, 0, 2])), ref)  # task 1 absent
        assert torch.equal(mm(x, task_ids=torch.full((6,), 1)), ref)  # one task only
        assert torch.equal(mm(x, task_ids=torch.tensor([1, 1, 0, 0, 2, 2])), ref)  # every task present
        # A task alone in the batch runs its conv on a batch of one; CPU conv kernels for N=1 round
        # differently from the full-batch kernel, so this case equals the original only up to rounding.
        lone = mm(x, task_ids=torch.tensor([2, 0, 2, 1, 0, 2]))
        torch.testing.assert_close(lone, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["kernel", "factorized"])
def test_fresh_model_equals_original_router_mode(layout):
    model = resnet()
    orig = copy.deepcopy(model)
    cfg = MoLAConfig(mode="router", num_experts=3, layout=layout, router_input_size=16,
                     target_modules="all_stages")
    mm = mola.inject(model, cfg).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(mm(x), orig(x))
        assert torch.equal(mm(x, task_ids=torch.tensor([0, 1, 1, 2, 0])), orig(x))


# -- gradient separation (MoLA-Grad) --------------------------------------------------------------
def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).to(DT)


@pytest.mark.parametrize("compute", ["auto", "merged", "lowrank", "reference"])
@pytest.mark.parametrize("layout", ["kernel", "factorized"])
@pytest.mark.parametrize("ids", [[0, 2, 1, 2, 0, 0], [2, 0, 2, 2, 0], [1, 1, 1]],
                         ids=["all_present", "task1_absent", "one_task"])
def test_gradient_separation(layout, compute, ids):
    torch.manual_seed(0)
    mm = mola.inject(small_net(), MoLAConfig(num_experts=3, layout=layout, compute=compute,
                                             target_modules=["0", "2", "6"]))
    randomize_b(mm, std=0.3)
    ids = torch.tensor(ids)
    x = torch.randn(len(ids), 3, 9, 9, dtype=DT)
    layers = mm.mola_layers()
    assert len(layers) == 3
    for t in range(3):
        mm.zero_grad(set_to_none=True)
        out = mm(x, task_ids=ids)
        loss = out[ids == t].pow(2).sum() + out.sum() * 0.0  # keep the graph even if task t is absent
        loss.backward()
        for name, layer in layers.items():
            for pname in ("lora_A", "lora_B"):
                g = getattr(layer, pname).grad
                assert g is not None
                g = g.reshape(3, -1)  # one row per expert (factorized conv lora_A is (E*r, Ci, kh, kw))
                for e in range(3):
                    if e == t and bool((ids == t).any()):
                        assert g[e].abs().max() > 0, f"{name}.{pname}[{e}] got no gradient"
                    else:
                        msg = f"{name}.{pname}[{e}] leaked gradient (task {t})"
                        assert torch.count_nonzero(g[e]) == 0, msg
        if (ids == t).any():
            assert mm.model[0].base_layer.weight.grad.abs().max() > 0  # shared weights learn from every task


def test_gradient_flows_only_to_present_tasks_whole_batch():
    torch.manual_seed(1)
    mm = mola.inject(small_net(), MoLAConfig(num_experts=4, target_modules=["2"]))
    randomize_b(mm)
    ids = torch.tensor([3, 0, 3, 3])
    mm(torch.randn(4, 3, 8, 8, dtype=DT), task_ids=ids).sum().backward()
    layer = mm.mola_layers()["2"]
    for e in range(4):
        present = e in (0, 3)
        assert (layer.lora_A.grad[e].abs().max() > 0) == present
        assert (layer.lora_B.grad[e].abs().max() > 0) == present


# -- errors ---------------------------------------------------------------------------------------
def test_error_pattern_matches_nothing():
    with pytest.raises(ValueError, match=r"'layer9\.conv1' matched no module"):
        mola.inject(resnet(), MoLAConfig(num_experts=2, target_modules=["layer9.conv1"]))


def test_error_pattern_hits_unwrappable_module():
    with pytest.raises(ValueError, match=r"cannot wrap module 'bn1' \(BatchNorm2d\)"):
        mola.inject(resnet(), MoLAConfig(num_experts=2, target_modules=["bn1"]))
    with pytest.raises(ValueError, match=r"cannot wrap module .*out_proj.*MultiheadAttention"):
        mola.inject(vit(), MoLAConfig(num_experts=2, target_modules=["out_proj"]))


def test_error_bad_presets_and_ranks():
    with pytest.raises(ValueError, match=r"(?s)'stage_last' matched no module.*Stage presets: last_stage"):
        mola.inject(resnet(), MoLAConfig(num_experts=2, target_modules="stage_last"))  # a name, not a preset
    with pytest.raises(ValueError, match="stage numbers"):
        mola.inject(resnet(), MoLAConfig(num_experts=2, target_modules="stages:5"))
    with pytest.raises(ValueError, match="rank dict"):
        mola.inject(resnet(), MoLAConfig(num_experts=2, rank={"layer4.0.conv1": 2}))
    with pytest.raises(ValueError, match="presets"):
        mola.inject(small_net(), MoLAConfig(num_experts=2))


def test_error_factorized_grouped_conv_names_layer():
    net = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=4))
    with pytest.raises(ValueError, match=r"'1'.*layout='kernel'"):
        mola.inject(net, MoLAConfig(num_experts=2, layout="factorized", target_modules=["0", "1"]))


@pytest.fixture
def grad_model():
    return mola.inject(resnet(), MoLAConfig(num_experts=3))


@pytest.mark.parametrize(
    "ids,match",
    [
        (torch.tensor([0, 3]), r"task id 3 out of range"),
        (torch.tensor([-1, 0]), r"task id -1 out of range"),
        (torch.tensor([0.0, 1.0]), r"integer tensor"),
        (torch.tensor([True, False]), r"integer tensor"),
        (torch.tensor([[0], [1]]), r"shape \(2,\)"),
        (torch.tensor([0, 1, 1]), r"shape \(2,\)"),
        ([0, 1], r"torch.Tensor"),
    ],
    ids=["too_high", "negative", "float", "bool", "2d", "too_long", "list"],
)
def test_error_bad_task_ids(grad_model, ids, match):
    with pytest.raises(ValueError, match=match):
        grad_model(torch.randn(2, 3, 32, 32), task_ids=ids)


def test_error_missing_task_ids_in_grad_mode(grad_model):
    with pytest.raises(ValueError, match="needs task_ids"):
        grad_model(torch.randn(2, 3, 32, 32))


def test_error_bad_weights(grad_model):
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"weights must have shape \(2, 3\), got \(2, 4\)"):
        grad_model(x, weights=torch.rand(2, 4))
    with pytest.raises(ValueError, match=r"weights must have shape \(2, 3\), got \(3,\)"):
        grad_model(x, weights=torch.rand(3))
    with pytest.raises(ValueError, match="floating"):
        grad_model(x, weights=torch.ones(2, 3, dtype=torch.long))


def test_error_inject_twice():
    model = resnet()
    mola.inject(model, MoLAConfig(num_experts=2))
    with pytest.raises(ValueError, match="already contains MoLA layers"):
        mola.inject(model, MoLAConfig(num_experts=2))


def test_error_num_experts_zero():
    with pytest.raises(ValueError, match="num_experts"):
        mola.inject(resnet(), MoLAConfig(num_experts=0))
    with pytest.raises(ValueError, match="num_experts"):
        mola.inject(resnet(), MoLAConfig())  # default 0 must be set explicitly


def test_error_bad_config_values():
    with pytest.raises(ValueError, match="mode"):
        MoLAConfig(mode="mixture", num_experts=2)
    with pytest.raises(ValueError, match="layout"):
        MoLAConfig(layout="lowrank", num_experts=2)


# -- parameter counts -----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["kernel", "factorized"])
def test_num_parameters_resnet_layer4(layout):
    e, r = 9, 4
    model = resnet(num_classes=9)
    backbone = sum(p.numel() for p in model.parameters())
    expected = 0
    for _, conv in model.layer4.named_modules():
        if isinstance(conv, nn.Conv2d):
            ci, co, k = conv.in_channels, conv.out_channels, conv.kernel_size[0]
            expected += e * r * k * k * (ci + co) if layout == "kernel" else e * r * (ci * k * k + co)
    counts = mola.inject(model, MoLAConfig(num_experts=e, rank=r, layout=layout)).num_parameters()
    assert set(counts) == {"backbone", "adapters", "router", "lift", "total"}
    assert all(type(v) is int for v in counts.values())
    assert counts["adapters"] == expected
    assert counts["backbone"] == backbone
    assert counts["router"] == 0 and counts["lift"] == 0
    assert counts["total"] == counts["backbone"] + counts["adapters"] + counts["router"] + counts["lift"]
    # the paper's numbers for layer4 (kernel layout): 9 * 4 * 9 * (256+512 + 3*1024) + 9 * 4 * (256+512)
    if layout == "kernel":
        assert expected == 9 * 4 * 9 * (768 + 3 * 1024) + 9 * 4 * 768


def test_num_parameters_router_mode_sums():
    mm = mola.inject(resnet(num_classes=9), MoLAConfig(mode="router", num_experts=9))
    counts = mm.num_parameters()
    assert counts["router"] == sum(p.numel() for p in mm.router.parameters()) > 0
    assert counts["lift"] == 9 * 32 + 32
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert counts["total"] == sum(p.numel() for p in mm.parameters())


# -- save / load ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["grad", "router"])
def test_save_load_round_trip(tmp_path, mode):
    backbone = resnet()
    cfg = MoLAConfig(mode=mode, num_experts=3, router_input_size=16, target_modules="stages:3,4")
    torch.manual_seed(10)
    src = mola.inject(copy.deepcopy(backbone), cfg).eval()
    randomize_b(src, std=0.05, seed=1)
    if mode == "router":
        with torch.no_grad():  # non-trivial router BN buffers too
            for m in src.router.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.9, 1.1)
    torch.manual_seed(20)
    dst = mola.inject(copy.deepcopy(backbone), cfg).eval()
    x = torch.randn(4, 3, 32, 32)
    ids = torch.tensor([0, 2, 2, 1])
    path = tmp_path / "sub" / "adapters.safetensors"
    src.save_adapters(path)
    with torch.no_grad():
        want = src(x, task_ids=ids)
        assert not torch.equal(dst(x, task_ids=ids), want)
        dst.load_adapters(path)
        assert torch.equal(dst(x, task_ids=ids), want)
        if mode == "router":
            src(x, task_ids=ids)
            z_src = src.routing.z.clone()
            dst(x, task_ids=ids)
            assert torch.equal(dst.routing.z, z_src)
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_load_into_other_config_raises(tmp_path):
    backbone = resnet()
    src = mola.inject(copy.deepcopy(backbone), MoLAConfig(num_experts=3))
    path = tmp_path / "a.safetensors"
    src.save_adapters(path)
    other = mola.inject(copy.deepcopy(backbone), MoLAConfig(num_experts=3, rank=8))
    with pytest.raises(ValueError, match="another MoLA config.*rank"):
        other.load_adapters(path)


def test_load_missing_and_corrupt_files(tmp_path):
    mm = mola.inject(resnet(), MoLAConfig(num_experts=2))
    with pytest.raises(FileNotFoundError):
        mm.load_adapters(tmp_path / "nope.safetensors")
    path = tmp_path / "a.safetensors"
    mm.save_adapters(path)
    data = path.read_bytes()
    before = {k: v.clone() for k, v in mm.state_dict().items()}
    for name, blob in [("half", data[: len(data) // 2]), ("tail_cut", data[:-16]), ("garbage", b"\x07" * 64),
                       ("empty", b"")]:
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(ValueError, match="corrupt or unreadable"):
            mm.load_adapters(bad)
    assert all(torch.equal(v, mm.state_dict()[k]) for k, v in before.items())


def test_load_foreign_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    mm = mola.inject(resnet(), MoLAConfig(num_experts=2))
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a mola adapter file"):
        mm.load_adapters(path)


# -- merge ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["kernel", "factorized"])
def test_merge_equals_task_forward(layout):
    mm = mola.inject(resnet().double(), MoLAConfig(num_experts=3, layout=layout, target_modules="stages:2,4"))
    mm.eval()
    randomize_b(mm, std=0.05)
    x = torch.randn(3, 3, 32, 32, dtype=DT)
    state = {k: v.clone() for k, v in mm.state_dict().items()}
    with torch.no_grad():
        outs = {t: mm(x, task_ids=torch.full((3,), t)) for t in range(3)}
        merged_outs = []
        for t in range(3):
            merged = mm.merge(t)
            assert not any(isinstance(m, MoLALayer) for m in merged.modules())
            assert type(merged.layer4[0].conv1) is nn.Conv2d
            assert type(merged.layer2[0].downsample[0]) is nn.Conv2d
            out = merged.eval()(x)
            torch.testing.assert_close(out, outs[t], **TOL)
            merged_outs.append(out)
            # the merged copy shares nothing with the MoLA model
            merged.layer4[0].conv1.weight.data.zero_()
            merged.fc.weight.data.zero_()
        assert not torch.allclose(merged_outs[0], merged_outs[1])
        # the MoLA model is unchanged: same state, same outputs, still MoLA layers
        for k, v in mm.state_dict().items():
            assert torch.equal(v, state[k]), k
        for t in range(3):
            assert torch.equal(mm(x, task_ids=torch.full((3,), t)), outs[t])
    assert isinstance(mm.model.layer4[0].conv1, MoLAConv2d)


def test_merge_out_of_range_raises():
    mm = mola.inject(resnet(), MoLAConfig(num_experts=3))
    for bad in (3, -1, 10):
        with pytest.raises(ValueError, match="out of range"):
            mm.merge(bad)


def test_load_adapters_accepts_legacy_5d_factorized_lora_a(tmp_path):
    """Adapter files written when the factorized conv lora_A was (E, r, Ci, kh, kw) still load, unchanged values."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = mola.inject(small_net(), MoLAConfig(num_experts=3, rank=2, layout="factorized", target_modules=["0"]))
    path = tmp_path / "a.safetensors"
    src.save_adapters(path)
    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    assert tensors["model.0.lora_A"].shape == (6, 3, 3, 3)
    tensors["model.0.lora_A"] = tensors["model.0.lora_A"].reshape(3, 2, 3, 3, 3)
    meta.pop("sha256")  # legacy files predate the adapter checksum
    save_file(tensors, str(path), metadata=meta)
    torch.manual_seed(1)
    dst = mola.inject(small_net(), MoLAConfig(num_experts=3, rank=2, layout="factorized", target_modules=["0"]))
    with pytest.warns(RuntimeWarning, match="has no checksum"):
        dst.load_adapters(path)
    assert torch.equal(dst.model[0].lora_A, src.model[0].lora_A)
