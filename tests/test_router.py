"""MoLA-Router (method.md §4-5): router, lift, TwD on the model, and the weights= override."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import mola
from mola import MoLAConfig
from mola.layers import Lift, MLPRouter, Router, twd_loss

DT = torch.float64
TOL = {"rtol": 0.0, "atol": 1e-10}


def resnet(num_classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=num_classes)


def router_param_count(cin: int, e: int, widths=(16, 32, 64), blocks: int = 3) -> int:
    """Closed form of method.md §4: 3x3 stem conv + BN, 3 stages of basic blocks, Linear(64 -> E)."""
    bn = 2  # weight + bias per channel
    total = 9 * cin * widths[0] + bn * widths[0]
    prev = widths[0]
    for i, w in enumerate(widths):
        for j in range(blocks):
            stride = 2 if i > 0 and j == 0 else 1
            total += 9 * prev * w + bn * w + 9 * w * w + bn * w
            if stride != 1 or prev != w:
                total += prev * w + bn * w  # 1x1 projection shortcut + BN
            prev = w
    return total + prev * e + e


# -- the router -----------------------------------------------------------------------------------
def test_router_follows_a_float64_model() -> None:
    """Injecting into a float64 model gives a float64 router and lift, equal to a float32 injection cast later."""
    cfg = MoLAConfig(mode="router", num_experts=3, router_input_size=16)
    mm64 = mola.inject(resnet().double(), cfg)
    mm32 = mola.inject(resnet(), cfg).double()  # same seed: same initial weights, cast after injection
    assert {p.dtype for p in mm64.parameters()} == {torch.float64}
    x = torch.randn(2, 3, 32, 32, dtype=DT)
    ids = torch.tensor([0, 2])
    got, ref = mm64.eval()(x, task_ids=ids), mm32.eval()(x, task_ids=ids)
    assert got.dtype == DT and mm64.routing.z is not None and mm64.routing.z.dtype == DT
    torch.testing.assert_close(got, ref, **TOL)


def test_router_parameter_count_e9():
    n = sum(p.numel() for p in Router(3, 9).parameters())
    assert n == router_param_count(3, 9) == 272409
    assert 0.26e6 < n < 0.28e6
    mm = mola.inject(resnet(num_classes=9), MoLAConfig(mode="router", num_experts=9))
    assert mm.num_parameters()["router"] == router_param_count(3, 9)
    assert mm.num_parameters()["lift"] == 9 * 32 + 32


def test_router_resizes_its_input():
    router = Router(3, 4, input_size=16).eval()
    seen = []
    router.stem.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape)))
    x = torch.randn(2, 3, 40, 24)
    logits = router(x)
    assert logits.shape == (2, 4)
    assert seen == [(2, 3, 16, 16)]
    small = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.equal(router(small), logits)


def test_router_rejects_wrong_input():
    with pytest.raises(ValueError, match=r"Router expects images \(B, 3, H, W\)"):
        Router(3, 4)(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="MLPRouter expects 10 input features"):
        MLPRouter(10, 3)(torch.randn(2, 7))


# -- router mode on ResNet-18 ---------------------------------------------------------------------
def test_router_mode_routing_state_and_twd_backprop():
    e = 3
    mm = mola.inject(resnet(), MoLAConfig(mode="router", num_experts=e, router_input_size=16))
    assert isinstance(mm.router, Router) and isinstance(mm.lift, Lift)
    assert mm.router.in_channels == 3 and mm.router.input_size == 16
    mm.train()
    x = torch.randn(6, 3, 32, 32)
    ids = torch.tensor([0, 1, 0, 2, 1, 1])
    out = mm(x, task_ids=ids)
    r = mm.routing
    assert out.shape == (6, 4)
    assert r.weights.shape == (6, e) and r.logits.shape == (6, e)
    torch.testing.assert_close(r.weights.sum(1), torch.ones(6), rtol=0, atol=1e-6)
    assert (r.weights > 0).all()
    torch.testing.assert_close(r.weights, torch.softmax(r.logits, -1))
    assert r.z.shape == (6, 32)
    torch.testing.assert_close(r.z, mm.lift(r.logits))  # lift reads the pre-softmax logits by default
    assert torch.equal(r.task_ids, ids)
    loss = mm.twd_loss()
    torch.testing.assert_close(loss, twd_loss(r.z, ids, 1.0))
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    (out.pow(2).mean() * 0 + loss).backward()
    for part in (mm.router, mm.lift):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().max() > 0 for g in grads)
    assert mm.router.stem[0].weight.grad.abs().max() > 0
    assert mm.router.fc.weight.grad.abs().max() > 0


def test_router_mode_lift_on_weights_and_mlp_lift():
    mm = mola.inject(resnet(), MoLAConfig(mode="router", num_experts=3, lift_input="weights", lift_hidden=8,
                                          lift_dim=5, router_input_size=16)).eval()
    with torch.no_grad():
        mm(torch.randn(2, 3, 32, 32))
    r = mm.routing
    assert r.z.shape == (2, 5)
    torch.testing.assert_close(r.z, mm.lift(r.weights))
    assert isinstance(mm.lift.net, nn.Sequential)


def test_twd_loss_errors_on_model():
    mm = mola.inject(resnet(), MoLAConfig(mode="router", num_experts=3, router_input_size=16)).eval()
    with torch.no_grad():
        mm(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="needs task ids"):
        mm.twd_loss()
    grad = mola.inject(resnet(), MoLAConfig(num_experts=3))
    with torch.no_grad():
        grad(torch.randn(2, 3, 32, 32), task_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="router codes"):
        grad.twd_loss()


def test_router_in_channels_from_first_conv():
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    orig = copy.deepcopy(net)
    mm = mola.inject(net, MoLAConfig(mode="router", num_experts=2, target_modules=["2"]))
    assert isinstance(mm.router, Router) and mm.router.in_channels == 1
    assert mm.router.stem[0].in_channels == 1
    x = torch.randn(3, 1, 12, 10)
    with torch.no_grad():
        assert torch.equal(mm.eval()(x), orig(x))
    assert mm.routing.weights.shape == (3, 2)
    override = mola.inject(copy.deepcopy(orig), MoLAConfig(mode="router", num_experts=2, target_modules=["2"],
                                                           router_in_channels=5))
    assert override.router.in_channels == 5


def test_mlp_model_gets_mlp_router():
    net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    orig = copy.deepcopy(net)
    mm = mola.inject(net, MoLAConfig(mode="router", num_experts=4, target_modules=["2"]))
    assert isinstance(mm.router, MLPRouter) and mm.router.in_features == 10
    x = torch.randn(5, 10)
    with torch.no_grad():
        assert torch.equal(mm(x), orig(x))
    torch.testing.assert_close(mm.routing.weights.sum(1), torch.ones(5), rtol=0, atol=1e-6)
    assert mm.routing.z.shape == (5, 32)


def test_resnet_router_type_without_conv_needs_channels():
    net = nn.Sequential(nn.Linear(10, 4))
    with pytest.raises(ValueError, match="router_in_channels"):
        mola.inject(net, MoLAConfig(mode="router", num_experts=2, target_modules=["0"], router_type="resnet"))


# -- weights= override and router output against a hand reference ---------------------------------
def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 6, 6))
    return net.to(DT)


def hand_tiny(mm: mola.MoLAModel, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-sample f(x_b; W0 + s sum_e w_b,e dW_e) for tiny_net, kernel layout, rank 2, alpha 16."""
    conv, lin = mm.model[0], mm.model[3]
    s = 16.0 / 2
    out = []
    for b in range(x.shape[0]):
        wc = conv.base_layer.weight.detach().clone()
        wl = lin.base_layer.weight.detach().clone()
        for e in range(w.shape[1]):
            wc += s * float(w[b, e]) * (conv.lora_B[e] @ conv.lora_A[e]).detach().view(wc.shape)
            wl += s * float(w[b, e]) * (lin.lora_B[e] @ lin.lora_A[e]).detach()
        h = F.relu(F.conv2d(x[b : b + 1], wc, conv.base_layer.bias, padding=1))
        out.append(F.linear(h.flatten(1), wl, lin.base_layer.bias))
    return torch.cat(out)


@pytest.mark.parametrize("mode", ["grad", "router"])
def test_weights_override_equals_reference(mode):
    e = 3
    mm = mola.inject(tiny_net(), MoLAConfig(mode=mode, num_experts=e, rank=2, target_modules=["0", "3"],
                                            router_in_channels=3)).eval()
    with torch.no_grad():
        for layer in mm.mola_layers().values():
            layer.lora_B.normal_()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 5, 6, generator=gen, dtype=DT)
    w = torch.randn(5, e, generator=gen, dtype=DT).softmax(-1)
    with torch.no_grad():
        out = mm(x, weights=w)
        assert mm.routing.dense and mm.routing.weights is w
        if mode == "router":
            assert mm.routing.logits is None  # the router is bypassed
        torch.testing.assert_close(out, hand_tiny(mm, x, w), **TOL)
        # with task ids alongside (kept for TwD / heads), the override still decides the mixing
        ids = torch.tensor([0, 1, 2, 1, 0])
        torch.testing.assert_close(mm(x, task_ids=ids, weights=w), hand_tiny(mm, x, w), **TOL)
        assert torch.equal(mm.routing.task_ids, ids)
        # one-hot weights reproduce the task-id path
        if mode == "grad":
            torch.testing.assert_close(mm(x, weights=F.one_hot(ids, e).to(DT)), mm(x, task_ids=ids), **TOL)
        base = hand_tiny(mm, x, torch.zeros_like(w))
        assert (out - base).abs().max() > 1e-3


def test_router_mode_output_equals_reference_with_router_weights():
    cfg = MoLAConfig(mode="router", num_experts=3, rank=2, target_modules=["0", "3"])
    mm = mola.inject(tiny_net(), cfg).eval()
    mm.router.to(DT)
    mm.lift.to(DT)
    with torch.no_grad():
        for layer in mm.mola_layers().values():
            layer.lora_B.normal_()
        x = torch.randn(4, 3, 5, 6, dtype=DT)
        out = mm(x)
        w = torch.softmax(mm.router(x), -1)
        torch.testing.assert_close(mm.routing.weights, w, **TOL)
        torch.testing.assert_close(out, hand_tiny(mm, x, w), **TOL)
