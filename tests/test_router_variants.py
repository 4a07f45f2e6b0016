"""Router variants (issue 18): router sharing (shared / per_stage / per_layer), E != T, task_to_expert, and the
cheaper router options (input size, width, blocks, stem stride) against an independent reference."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mola
from mola import MoLAConfig
from mola.analysis.routing import collect_codes
from mola.data.base import ArrayTaskDataset, Scenario, TaskInfo
from mola.layers import Router, twd_loss
from mola.models import BackboneConfig, ModelConfig, build_model
from mola.models.backbones import SmallCNN

DT = torch.float64



def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(3, width=4).to(DT)


def cfg(**kw: Any) -> MoLAConfig:
    base: dict[str, Any] = dict(mode="router", num_experts=3, rank=2, target_modules="stages:3,4", router_width=4,
                                router_blocks=1, router_input_size=None)
    base.update(kw)
    return MoLAConfig(**base)


def randomize(mm: mola.MoLAModel, seed: int = 1) -> None:
    """Non-zero B so the adapters change the output (a fresh layer computes exactly its base op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mm.adapter_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def data(n: int = 6, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 12, 12, generator=g, dtype=DT), torch.arange(n) % 3


def one_router_count(mm: mola.MoLAModel) -> int:
    router, lift = mm.router_pairs()[0]
    return sum(p.numel() for p in router.parameters()), sum(p.numel() for p in lift.parameters())


# -- router sharing ------------------------------------------------------------------------------
def test_per_stage_routers_have_their_own_weights_and_counts():
    mm = mola.inject(cnn(), cfg(router_sharing="per_stage")).to(DT).eval()
    assert mm.router_names == ["layer3", "layer4"]
    assert isinstance(mm.router, nn.ModuleList) and len(mm.router) == 2 and len(mm.routings) == 2
    # every MoLA layer reads the routing of its own stage's router
    for name, layer in mm.mola_layers().items():
        assert layer.routing is mm.routings[0 if name.startswith("layer3.") else 1]
    # independently initialised routers: different parameters, different mixing for the same input
    p0, p1 = (torch.cat([p.flatten() for p in r.parameters()]) for r in mm.router)
    assert not torch.equal(p0, p1)
    x, ids = data()
    mm(x, task_ids=ids)
    w0, w1 = mm.routings[0].weights, mm.routings[1].weights
    assert w0 is not None and w1 is not None and w0.shape == w1.shape == (6, 3)
    assert not torch.allclose(w0, w1)
    # parameter count: stages x one router (and x one lift)
    shared = mola.inject(cnn(), cfg()).to(DT)
    r1, l1 = one_router_count(shared)
    counts = mm.num_parameters()
    assert counts["router"] == 2 * r1 and counts["lift"] == 2 * l1
    assert counts["total"] == shared.num_parameters()["total"] + r1 + l1


def test_per_layer_routers_one_per_mola_layer():
    mm = mola.inject(cnn(), cfg(router_sharing="per_layer")).to(DT)
    names = mm.layer_names
    assert mm.router_names == names and len(names) >= 4  # conv1, conv2 (+ shortcut) of two stages
    r1, l1 = one_router_count(mola.inject(cnn(), cfg()))
    assert mm.num_parameters()["router"] == len(names) * r1
    assert mm.num_parameters()["lift"] == len(names) * l1
    assert {id(layer.routing) for layer in mm.mola_layers().values()} == {id(r) for r in mm.routings}


@pytest.mark.parametrize("sharing", ["per_stage", "per_layer"])
def test_equal_router_weights_reproduce_the_shared_router(sharing):
    shared = mola.inject(cnn(), cfg()).to(DT).eval()
    randomize(shared)
    multi = mola.inject(cnn(), cfg(router_sharing=sharing)).to(DT).eval()
    multi.load_state_dict(shared.state_dict(), strict=False)  # same backbone and adapters
    for router, lift in multi.router_pairs():
        router.load_state_dict(shared.router.state_dict())
        lift.load_state_dict(shared.lift.state_dict())
    x, ids = data()
    ref = shared(x, task_ids=ids)
    out = multi(x, task_ids=ids)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # every router's code equals the shared one, so the mean TwD equals the shared TwD
    torch.testing.assert_close(multi.twd_loss(), shared.twd_loss(), rtol=0, atol=1e-12)


def test_twd_is_the_mean_over_routers_and_reaches_every_router():
    mm = mola.inject(cnn(), cfg(router_sharing="per_stage")).to(DT).train()
    x, ids = data()
    mm(x, task_ids=ids)
    expected = sum(twd_loss(r.z, ids, 1.0) for r in mm.routings) / len(mm.routings)
    loss = mm.twd_loss()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    loss.backward()
    for router, lift in mm.router_pairs():
        assert router.fc.weight.grad is not None and router.fc.weight.grad.abs().sum() > 0
        assert all(p.grad is not None for p in lift.parameters())


def test_routing_record_keeps_every_router_and_task_inference_code():
    mm = mola.inject(cnn(), cfg(router_sharing="per_stage", lift_dim=5)).to(DT)
    x, ids = data(8)
    loader = [(x[:4], None, ids[:4]), (x[4:], None, ids[4:])]
    codes = collect_codes(mm, loader)
    assert codes["router_weights"].shape == (2, 8, 3)
    assert codes["weights"].shape == (8, 3) and codes["z"].shape == (8, 10)
    mm.eval()
    with torch.no_grad():
        mm.set_routing(x)
        w = [r.weights for r in mm.routings]
        z = [r.z for r in mm.routings]
    np.testing.assert_allclose(codes["router_weights"][1], w[1].numpy(), rtol=1e-6)
    np.testing.assert_allclose(codes["weights"], ((w[0] + w[1]) / 2).numpy(), rtol=1e-6)
    unit = [zi / zi.norm(dim=1, keepdim=True) for zi in z]
    np.testing.assert_allclose(codes["z"], torch.cat(unit, 1).numpy(), rtol=1e-6, atol=1e-7)


def test_per_stage_save_load_and_merge(tmp_path):
    mm = mola.inject(cnn(), cfg(router_sharing="per_stage")).to(DT).eval()
    randomize(mm)
    path = tmp_path / "a.safetensors"
    mm.save_adapters(path)
    other = mola.inject(cnn(), cfg(router_sharing="per_stage")).to(DT).eval()
    other.load_adapters(path)
    x, ids = data()
    torch.testing.assert_close(other(x, task_ids=ids), mm(x, task_ids=ids), rtol=0, atol=0)
    shared = mola.inject(cnn(), cfg()).to(DT)
    with pytest.raises(ValueError, match="router_sharing"):
        shared.load_adapters(path)
    plain = mm.merge(1)
    w = torch.zeros(6, 3, dtype=DT)
    w[:, 1] = 1
    torch.testing.assert_close(plain(x), mm(x, weights=w), rtol=1e-10, atol=1e-10)


def test_per_stage_needs_known_stages_and_bad_sharing_is_named():
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(x)

    with pytest.raises(ValueError, match="per_stage"):
        mola.inject(Flat(), MoLAConfig(mode="router", num_experts=2, target_modules=["conv"],
                                       router_sharing="per_stage"))
    with pytest.raises(ValueError, match="router_sharing='everywhere'"):
        MoLAConfig(router_sharing="everywhere")  # type: ignore[arg-type]


# -- E != T ---------------------------------------------------------------------------------------
def tiny_scenario(num_tasks: int = 3) -> Scenario:
    tasks = [TaskInfo(f"t{i}", num_classes=2 + i) for i in range(num_tasks)]
    ds = ArrayTaskDataset(torch.zeros(3, 3, 12, 12), torch.zeros(3), [0, 0, 0])
    return Scenario("tiny", "multi_input", tasks, ds, ds, ds, (3, 12, 12))


def mola_net(scen: Scenario, mcfg: MoLAConfig) -> nn.Module:
    mc = ModelConfig(arch="mola", backbone=BackboneConfig(name="small_cnn", width=4), head_hidden=8, mola=mcfg)
    torch.manual_seed(0)
    return build_model(scen, mc)


@pytest.mark.parametrize("experts", [2, 3, "T", "2T"])
def test_router_mode_any_number_of_experts(experts):
    scen = tiny_scenario(3)
    e = {"T": 3, "2T": 6}.get(experts, experts)  # type: ignore[call-overload]
    net = mola_net(scen, MoLAConfig(mode="router", num_experts=e, rank=2, router_width=4, router_blocks=1,
                                    lift_dim=7))
    assert net.encoder.num_experts == e
    x = torch.randn(6, 3, 12, 12)
    ids = torch.arange(6) % 3
    outs = net(x, ids)
    r = net.encoder.routing
    assert r.weights.shape == (6, e) and r.z.shape == (6, 7)
    torch.testing.assert_close(r.weights.sum(1), torch.ones(6))
    extra = net.extra_loss()
    assert extra is not None and torch.isfinite(extra)
    torch.testing.assert_close(extra, 0.1 * twd_loss(r.z, ids, 1.0))
    loss = sum(o.sum() for o in outs.values()) + extra
    loss.backward()
    for p in net.encoder.adapter_parameters().values():
        if p.grad is not None and p.grad.abs().sum() > 0:
            break
    else:
        raise AssertionError("no adapter received a gradient")
    assert net.encoder.router.fc.weight.grad.shape == (e, 16)


def test_grad_mode_needs_e_equal_t_unless_task_to_expert():
    scen = tiny_scenario(4)
    with pytest.raises(ValueError, match="task_to_expert"):
        mola_net(scen, MoLAConfig(mode="grad", num_experts=3, rank=2))
    with pytest.raises(ValueError, match="4 tasks"):
        mola_net(scen, MoLAConfig(mode="grad", rank=2, task_to_expert=[0, 1, 1]))
    net = mola_net(scen, MoLAConfig(mode="grad", rank=2, task_to_expert=[0, 0, 1, 2]))
    assert net.encoder.num_experts == 3  # E defaults to the adapters the map names
    with pytest.raises(ValueError, match="router mode"):
        MoLAConfig(mode="router", task_to_expert=[0, 0, 1])
    with pytest.raises(ValueError, match="names adapter 3 but num_experts=3"):
        MoLAConfig(mode="grad", num_experts=3, task_to_expert=[0, 3])
    with pytest.raises(ValueError, match="adapter indices"):
        MoLAConfig(mode="grad", task_to_expert=[0, -1])


def test_task_to_expert_separates_gradients_between_groups():
    mcfg = MoLAConfig(mode="grad", num_experts=2, rank=2, target_modules="stages:4", task_to_expert=[0, 0, 1])
    mm = mola.inject(cnn(), mcfg).to(DT)
    randomize(mm)
    x, _ = data(4)

    def grads(task: int) -> dict[int, float]:
        mm.zero_grad()
        mm(x, task_ids=torch.full((4,), task)).sum().backward()
        out = {0: 0.0, 1: 0.0}
        for layer in mm.mola_layers().values():
            for p in (layer.lora_A, layer.lora_B):
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                for e in (0, 1):
                    out[e] += float(g[e].abs().sum())
        return out

    for task, own in ((0, 0), (1, 0), (2, 1)):
        g = grads(task)
        assert g[own] > 0 and g[1 - own] == 0, (task, g)
    # tasks 0 and 1 share adapter 0: same output; task 2 differs
    with torch.no_grad():
        out = [mm(x, task_ids=torch.full((4,), t)) for t in range(3)]
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    assert not torch.allclose(out[0], out[2])
    # merge(t) folds in task t's shared adapter
    torch.testing.assert_close(mm.merge(1)(x), out[1], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="task_to_expert has 3 tasks"):
        mm(x, task_ids=torch.full((4,), 3))


# -- the cheaper router options --------------------------------------------------------------------
def reference_router(router: Router, x: Tensor, stem_stride: int, size: int | None) -> Tensor:
    """The pre-option router written out with functional ops: 3x3 stride-1 stem, 3 stages of basic blocks
    (stride 2 in the first block of stages 2 and 3), global average pool, Linear (eval-mode BN)."""
    def bn(h: Tensor, m: nn.BatchNorm2d) -> Tensor:
        return (h - m.running_mean[None, :, None, None]) / torch.sqrt(m.running_var[None, :, None, None] + m.eps) \
            * m.weight[None, :, None, None] + m.bias[None, :, None, None]

    if size is not None:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    h = F.relu(bn(F.conv2d(x, router.stem[0].weight, stride=stem_stride, padding=1), router.stem[1]))
    for blk in router.stages:
        s = blk.conv1.stride[0]
        out = F.relu(bn(F.conv2d(h, blk.conv1.weight, stride=s, padding=1), blk.bn1))
        out = bn(F.conv2d(out, blk.conv2.weight, padding=1), blk.bn2)
        short = h if isinstance(blk.shortcut, nn.Identity) else bn(F.conv2d(h, blk.shortcut[0].weight, stride=s),
                                                                   blk.shortcut[1])
        h = F.relu(out + short)
    return h.mean(dim=(2, 3)) @ router.fc.weight.T + router.fc.bias


def randomize_bn(module: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=DT) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=DT) + 0.5)


def test_router_options_at_old_values_are_the_old_router():
    old = dict(router_input_size=None, router_width=16, router_blocks=3, router_stem_stride=1)
    torch.manual_seed(0)
    mm = mola.inject(cnn(), MoLAConfig(mode="router", num_experts=4, target_modules="stages:4", **old)).to(DT).eval()
    router = mm.router
    assert isinstance(router, Router)
    widths = [m.out_channels for m in router.modules() if isinstance(m, nn.Conv2d)]
    assert widths[0] == 16 and max(widths) == 64 and len(router.stages) == 9
    randomize_bn(router)
    x = torch.randn(3, 3, 20, 20, dtype=DT)
    torch.testing.assert_close(router(x), reference_router(router, x, 1, None), rtol=0, atol=1e-10)
    # the old state-dict keys and shapes (checkpoints of the old router load unchanged)
    torch.manual_seed(0)
    legacy = Router(3, 4).to(DT)
    assert {k: v.shape for k, v in legacy.state_dict().items()} == {k: v.shape for k, v in router.state_dict().items()}


@pytest.mark.parametrize(("width", "blocks", "stride", "size"), [(8, 2, 2, None), (4, 1, 1, 16), (12, 1, 2, 16)])
def test_router_options_match_the_reference(width, blocks, stride, size):
    torch.manual_seed(0)
    router = Router(3, 5, widths=(width, 2 * width, 4 * width), blocks=blocks, input_size=size,
                    stem_stride=stride).to(DT).eval()
    assert len(router.stages) == 3 * blocks
    randomize_bn(router)
    x = torch.randn(2, 3, 24, 24, dtype=DT)
    torch.testing.assert_close(router(x), reference_router(router, x, stride, size), rtol=0, atol=1e-10)


def test_auto_input_size_shrinks_only_large_inputs():
    router = Router(3, 2, widths=(4, 8, 16), blocks=1, input_size="auto").eval()
    seen: list[tuple[int, ...]] = []
    router.stem.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape[-2:])))
    router(torch.randn(1, 3, 64, 64))
    router(torch.randn(1, 3, 28, 28))
    router(torch.randn(1, 3, 32, 32))
    assert seen == [(32, 32), (28, 28), (32, 32)]
    assert MoLAConfig().router_input_size == "auto"
    for bad in (0, -3, "big", 2.5):
        with pytest.raises(ValueError, match="router_input_size"):
            MoLAConfig(router_input_size=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="router_width"):
        MoLAConfig(router_width=0)
    with pytest.raises(ValueError, match="router_stem_stride"):
        MoLAConfig(router_stem_stride=3)


def test_router_options_through_the_run_config():
    from mola.engine.config import load_config

    rc = load_config(None, ["model.arch=mola", "model.mola.mode=router", "model.mola.router_sharing=per_stage",
                            "model.mola.router_input_size=auto", "model.mola.router_width=8",
                            "model.mola.task_to_expert=null"])
    assert rc.model.mola.router_sharing == "per_stage" and rc.model.mola.router_width == 8
    assert rc.model.mola.router_input_size == "auto"
    with pytest.raises(ValueError, match="router_sharing"):
        load_config(None, ["model.mola.router_sharing=sometimes"])
    net = mola_net(tiny_scenario(3), copy.deepcopy(rc.model.mola))
    assert len(net.encoder.router_names) == 1  # small_cnn last stage only: one stage, one router


def test_routing_summary_reports_each_router():
    from mola.analysis.routing import routing_summary

    rng = np.random.default_rng(0)
    tasks = np.array([0, 0, 1, 1, 2, 2])
    per = rng.dirichlet(np.ones(3), size=(2, 6))  # (R=2, N=6, E=3)
    codes = {"z": rng.normal(size=(6, 4)), "task_ids": tasks, "weights": per.mean(0), "router_weights": per}
    s = routing_summary(codes, codes, 3, ["a", "b", "c"], ["layer3", "layer4"])
    assert s["router_names"] == ["layer3", "layer4"]
    got = np.array(s["router_mean_weights"])
    assert got.shape == (2, 3, 3)
    for r in range(2):
        for t in range(3):
            np.testing.assert_allclose(got[r, t], per[r, tasks == t].mean(0))
    one = routing_summary({**codes, "router_weights": per[:1]}, {**codes, "router_weights": per[:1]}, 3)
    assert "router_names" not in one  # a single (shared) router adds nothing
