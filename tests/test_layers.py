"""MoLAConv2d / MoLALinear against a per-sample reference written by hand from method.md §2.

Every numerical check runs in float64 and compares with ``hand_reference``, which rebuilds dW_e from
``lora_A``/``lora_B`` itself and applies the plain functional op sample by sample.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mola.layers import MoLAConv2d, MoLALinear, Routing

DT = torch.float64
TOL = {"rtol": 0.0, "atol": 1e-10}
E = 4
# Task-id batches for E = 4: task 1 absent and task 3 alone; one task only; one sample; every task present.
ID_SETS = {
    "absent_and_alone": [2, 0, 2, 3, 0, 2],
    "one_task": [1, 1, 1],
    "single_sample": [3],
    "all_tasks": [0, 1, 2, 3, 3, 1],
}


# -- independent reference ------------------------------------------------------------------------
def hand_delta(layer: nn.Module, e: int) -> torch.Tensor:
    """dW_e exactly as method.md §2 defines it, from the raw adapter tensors."""
    b = layer.lora_B.detach()[e]
    w0 = layer.base_layer.weight
    if isinstance(layer, MoLALinear):
        return b @ layer.lora_A.detach()[e]
    if layer.layout == "kernel":
        # A_e (r*kh, (Ci/g)*kw), B_e (Co*kh, r*kh)
        return (b @ layer.lora_A.detach()[e]).view(w0.shape)
    # lora_A (E*r, Ci, kh, kw): A_e is rows e*r .. e*r+r-1; B_e (Co, r)
    r = layer.rank
    return (b @ layer.lora_A.detach()[e * r : (e + 1) * r].flatten(1)).view(w0.shape)


def hand_op(base: nn.Module, x_b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(base, nn.Linear):
        return F.linear(x_b, weight, base.bias)
    padding = base.padding
    if base.padding_mode != "zeros":
        ph, pw = base.padding
        x_b = F.pad(x_b, (pw, pw, ph, ph), mode=base.padding_mode)
        padding = 0
    return F.conv2d(x_b, weight, base.bias, base.stride, padding, base.dilation, base.groups)


def hand_reference(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y_b = f(x_b; W0 + s * sum_e w_b,e dW_e), s = alpha / r, one sample at a time."""
    s = layer.alpha / layer.rank
    w0 = layer.base_layer.weight.detach()
    deltas = [hand_delta(layer, e) for e in range(layer.num_experts)]
    outs = []
    for b in range(x.shape[0]):
        wb = w0.clone()
        for e in range(layer.num_experts):
            wb = wb + s * float(w[b, e]) * deltas[e]
        outs.append(hand_op(layer.base_layer, x[b : b + 1], wb))
    return torch.cat(outs)


# -- helpers --------------------------------------------------------------------------------------
def make_layer(base: nn.Module, layout: str, compute: str, rank: int = 2, alpha: float = 16.0, seed: int = 0):
    torch.manual_seed(seed)
    base = base.to(DT)
    cls = MoLAConv2d if isinstance(base, nn.Conv2d) else MoLALinear
    layer = cls(base, E, rank, alpha=alpha, layout=layout, compute=compute, name="probe")
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 at init; make the adapters non-trivial
    routing = Routing(num_experts=E)
    layer.routing = routing
    return layer, routing


def check_paths(layer: nn.Module, routing: Routing, make_x, route: str) -> None:
    """Run ``layer`` on every ``ID_SETS`` batch (task ids or dense weights); compare with the reference."""
    gen = torch.Generator().manual_seed(1)
    for name, ids_list in ID_SETS.items():
        ids = torch.tensor(ids_list)
        x = make_x(len(ids_list), gen)
        if route == "ids":
            routing.set_task_ids(ids)
            w = F.one_hot(ids, E).to(DT)
        elif route == "softmax":
            w = torch.randn(len(ids_list), E, generator=gen, dtype=DT).softmax(-1)
            routing.set_weights(w)
        else:  # arbitrary real mixing weights (negative, not summing to 1)
            w = torch.randn(len(ids_list), E, generator=gen, dtype=DT)
            routing.set_weights(w)
        out = layer(x)
        ref = hand_reference(layer, x, w)
        assert out.shape == ref.shape, name
        torch.testing.assert_close(out, ref, **TOL, msg=lambda m, n=name: f"{n}: {m}")
        # the adapters really change the output (so the comparison is not vacuous)
        base_out = hand_op(layer.base_layer, x, layer.base_layer.weight.detach())
        assert (ref - base_out).abs().max() > 1e-3, name


# -- Conv2d ---------------------------------------------------------------------------------------
# (id, Conv2d kwargs, (H, W)); inputs are non-square everywhere.
CONV_CASES = [
    ("stride2_pad_bias", dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1), (9, 7)),
    ("dilation2", dict(in_channels=4, out_channels=5, kernel_size=3, padding=2, dilation=2, bias=False),
     (10, 7)),
    ("ci_div_k", dict(in_channels=6, out_channels=4, kernel_size=3, padding=1), (7, 5)),
    ("groups_ci_g4_k3", dict(in_channels=8, out_channels=6, kernel_size=3, padding=1, groups=2), (7, 6)),
    ("groups_ci_g6_k3", dict(in_channels=12, out_channels=8, kernel_size=3, padding=1, groups=2), (6, 8)),
    ("groups_stride_dil", dict(in_channels=12, out_channels=9, kernel_size=3, stride=2, padding=2,
                               dilation=2, groups=3), (9, 8)),
    ("depthwise", dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6), (5, 7)),
    ("kernel_3x1", dict(in_channels=4, out_channels=6, kernel_size=(3, 1), padding=(1, 0)), (7, 5)),
    ("kernel_3x1_div", dict(in_channels=6, out_channels=5, kernel_size=(3, 1), stride=(2, 1),
                            padding=(1, 0)), (8, 5)),
    ("kernel_1x3", dict(in_channels=4, out_channels=3, kernel_size=(1, 3), padding=(0, 1)), (5, 7)),
    ("reflect", dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"),
     (7, 9)),
    ("circular_stride", dict(in_channels=6, out_channels=4, kernel_size=3, stride=2, padding=1,
                             padding_mode="circular"), (8, 6)),
    ("conv1x1", dict(in_channels=5, out_channels=7, kernel_size=1), (4, 6)),
    ("conv1x1_stride2", dict(in_channels=5, out_channels=7, kernel_size=1, stride=2, bias=False), (7, 6)),
]


def _conv_params():
    for cid, kw, hw in CONV_CASES:
        for layout in ("kernel", "factorized"):
            if kw.get("groups", 1) > 1 and layout == "factorized":
                continue
            if layout == "factorized" and isinstance(kw["kernel_size"], tuple) and cid != "kernel_3x1":
                continue
            yield pytest.param(kw, hw, layout, id=f"{cid}-{layout}")


ROUTES = [("auto", "ids"), ("merged", "ids"), ("lowrank", "ids"), ("auto", "softmax"), ("auto", "signed"),
          ("reference", "ids"),
          ("reference", "softmax")]


@pytest.mark.parametrize("compute,route", ROUTES, ids=[f"{c}-{r}" for c, r in ROUTES])
@pytest.mark.parametrize("conv_kw,hw,layout", list(_conv_params()))
def test_conv_matches_hand_reference(conv_kw, hw, layout, compute, route):
    layer, routing = make_layer(nn.Conv2d(**conv_kw), layout, compute)
    cin = conv_kw["in_channels"]

    def make_x(b, gen):
        return torch.randn(b, cin, *hw, generator=gen, dtype=DT)

    check_paths(layer, routing, make_x, route)


def test_conv_non_default_alpha_and_rank():
    layer, routing = make_layer(nn.Conv2d(6, 4, 3, padding=1, groups=2), "kernel", "auto", rank=3, alpha=3.0)
    assert layer.lora_A.shape == (E, 3 * 3, 3 * 3)
    check_paths(layer, routing, lambda b, g: torch.randn(b, 6, 5, 6, generator=g, dtype=DT), "ids")
    check_paths(layer, routing, lambda b, g: torch.randn(b, 6, 5, 6, generator=g, dtype=DT), "softmax")


# -- Linear ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("compute,route", ROUTES, ids=[f"{c}-{r}" for c, r in ROUTES])
@pytest.mark.parametrize("layout", ["kernel", "factorized"])
@pytest.mark.parametrize("tokens", [None, 5], ids=["BC", "BLC"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_matches_hand_reference(tokens, layout, compute, route, bias):
    layer, routing = make_layer(nn.Linear(6, 5, bias=bias), layout, compute, rank=3)

    def make_x(b, gen):
        shape = (b, 6) if tokens is None else (b, tokens, 6)
        return torch.randn(*shape, generator=gen, dtype=DT)

    check_paths(layer, routing, make_x, route)


# -- shapes, init, layouts ------------------------------------------------------------------------
def test_adapter_shapes_and_init():
    conv = MoLAConv2d(nn.Conv2d(8, 6, (3, 2), groups=2), 5, 4, layout="kernel")
    assert conv.lora_A.shape == (5, 4 * 3, 4 * 2)  # (r*kh, (Ci/g)*kw)
    assert conv.lora_B.shape == (5, 6 * 3, 4 * 3)  # (Co*kh, r*kh)
    fac = MoLAConv2d(nn.Conv2d(8, 6, 3), 5, 4, layout="factorized")
    assert fac.lora_A.shape == (5 * 4, 8, 3, 3)  # (E*r, Ci, kh, kw): 4-D, peft's conv lora_A per expert
    assert fac.lora_B.shape == (5, 6, 4)
    lin = MoLALinear(nn.Linear(7, 3), 5, 2)
    assert lin.lora_A.shape == (5, 2, 7) and lin.lora_B.shape == (5, 3, 2)
    for layer in (conv, fac, lin):
        assert torch.count_nonzero(layer.lora_B) == 0
        assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()
        assert layer.scaling == 16.0 / layer.rank
        # A is initialised per expert: no two experts share the same A
        per_expert = layer.lora_A.reshape(5, -1)
        assert not torch.equal(per_expert[0], per_expert[1])


@pytest.mark.parametrize("layout", ["kernel", "factorized"])
def test_fresh_layer_equals_base_exactly(layout):
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, 3, padding=1)
    layer = MoLAConv2d(base, 3, 2, layout=layout)
    routing = Routing(3)
    layer.routing = routing
    x = torch.randn(5, 4, 6, 7)
    routing.set_task_ids(torch.tensor([2, 2, 2, 2, 2]))
    assert torch.equal(layer(x), base(x))
    routing.set_weights(torch.rand(5, 3))
    assert torch.equal(layer(x), base(x))


def test_factorized_with_groups_raises_naming_layer():
    with pytest.raises(ValueError, match=r"'block\.conv'.*groups.*layout='kernel'"):
        MoLAConv2d(nn.Conv2d(8, 6, 3, groups=2), 3, 2, layout="factorized", name="block.conv")


def test_layer_moves_with_to_and_double():
    layer = MoLAConv2d(nn.Conv2d(3, 4, 3), 2, 2)
    layer.double()
    assert layer.lora_A.dtype == DT and layer.lora_B.dtype == DT and layer.weight.dtype == DT
    lin = MoLALinear(nn.Linear(3, 4), 2, 2).to(DT)
    assert lin.lora_A.dtype == DT and lin.base_layer.bias.dtype == DT


def test_empty_batch_in_both_modes():
    layer, routing = make_layer(nn.Conv2d(4, 6, 3, padding=1), "kernel", "auto")
    x = torch.zeros(0, 4, 5, 5, dtype=DT)
    routing.set_task_ids(torch.zeros(0, dtype=torch.long))
    assert layer(x).shape == (0, 6, 5, 5)
    routing.set_weights(torch.zeros(0, E, dtype=DT))
    assert layer(x).shape == (0, 6, 5, 5)


def test_merged_weight_is_w0_plus_scaled_delta():
    layer, _ = make_layer(nn.Conv2d(6, 4, 3, groups=2), "kernel", "auto")
    for e in range(E):
        ref = layer.base_layer.weight + (16.0 / 2) * hand_delta(layer, e)
        torch.testing.assert_close(layer.merged_weight(e), ref, **TOL)


# -- errors ---------------------------------------------------------------------------------------
def test_layer_argument_errors():
    with pytest.raises(ValueError, match="num_experts"):
        MoLAConv2d(nn.Conv2d(3, 4, 3), 0, 2)
    with pytest.raises(ValueError, match="rank"):
        MoLALinear(nn.Linear(3, 4), 2, 0)
    with pytest.raises(ValueError, match="layout"):
        MoLALinear(nn.Linear(3, 4), 2, 2, layout="diagonal")
    with pytest.raises(ValueError, match="compute"):
        MoLALinear(nn.Linear(3, 4), 2, 2, compute="fast")
    with pytest.raises(ValueError, match="wraps nn.Conv2d"):
        MoLAConv2d(nn.Linear(3, 4), 2, 2)
    with pytest.raises(ValueError, match="wraps nn.Linear"):
        MoLALinear(nn.Conv2d(3, 4, 1), 2, 2)


def test_layer_routing_errors():
    layer = MoLALinear(nn.Linear(3, 4), 2, 2, name="head.fc")
    with pytest.raises(RuntimeError, match="head.fc"):
        layer(torch.randn(2, 3))
    routing = Routing(2)
    layer.routing = routing
    routing.set_task_ids(torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="batch of 2 samples"):
        layer(torch.randn(2, 3))


def _measured_lowrank_ratio(layer: nn.Module, x: torch.Tensor, experts: int) -> float:
    """(FLOPs of the layer's low-rank task path - FLOPs of its base op) / base FLOPs, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    layer = copy.deepcopy(layer)
    layer.compute = "lowrank"
    layer.routing = Routing(experts)
    layer.routing.set_task_ids(torch.zeros(x.shape[0], dtype=torch.long))
    with FlopCounterMode(display=False) as total, torch.no_grad():
        layer(x)
    with FlopCounterMode(display=False) as base, torch.no_grad():
        layer.base_layer(x)
    return (total.get_total_flops() - base.get_total_flops()) / base.get_total_flops()


def test_auto_task_path_follows_cost_model():
    """auto: low-rank (one-hot) path while its extra multiply-adds stay under the base op's, merged beyond."""
    conv = nn.Conv2d(256, 256, 3, padding=1)
    cheap = MoLAConv2d(conv, 4, 2)
    dear = MoLAConv2d(nn.Conv2d(256, 256, 3, padding=1), 64, 8)
    # independent reference: the extra FLOPs torch's FlopCounterMode counts in the low-rank forward, over the base op's
    assert cheap.lowrank_cost_ratio() == pytest.approx(_measured_lowrank_ratio(cheap, torch.randn(2, 256, 8, 8), 4))
    assert cheap.task_path == "lowrank" and dear.task_path == "merged"
    assert MoLAConv2d(nn.Conv2d(64, 64, 3), 64, 8, compute="lowrank").task_path == "lowrank"
    lin = MoLALinear(nn.Linear(32, 16), 3, 2)
    assert lin.lowrank_cost_ratio() == pytest.approx(_measured_lowrank_ratio(lin, torch.randn(5, 32), 3))


def test_auto_task_path_counts_merge_cost_on_small_maps():
    """Above the ratio threshold, small inputs still take the low-rank path: building E merged weights
    (E * r * kh weight-sized products in the kernel layout) costs more than ratio * positions base ops."""
    dear = MoLAConv2d(nn.Conv2d(256, 256, 3, padding=1, stride=2), 64, 8)
    ratio = dear.lowrank_cost_ratio()
    assert ratio > 1 and dear.merge_cost_ratio() == 8 * 3
    small, big = torch.randn(2, 256, 4, 4), torch.randn(64, 256, 32, 32)
    assert dear.output_positions(small) == 2 * 2 * 2 and dear.output_positions(big) == 64 * 16 * 16
    assert ratio * 8 <= 64 * 24 < ratio * 64 * 256  # the hand-computed sides of the rule for both inputs
    assert dear.task_path_for(small) == "lowrank" and dear.task_path_for(big) == "merged"
    assert MoLAConv2d(nn.Conv2d(8, 8, 3, padding="same"), 2, 1).output_positions(torch.randn(3, 8, 5, 7)) == 105
    lin = MoLALinear(nn.Linear(4, 4), 16, 4)  # ratio 16*4*8/16 = 32 > 1; merge 16 * 4 = 64 MAC-equivalents
    assert lin.task_path_for(torch.randn(2, 4)) == "lowrank"  # 32 * 2 <= 64
    assert lin.output_positions(torch.randn(3, 5, 4)) == 15 and lin.task_path_for(torch.randn(3, 5, 4)) == "merged"
    # both paths are exact: the choice never changes the result
    routing = Routing(64)
    dear.routing = routing
    ids = torch.tensor([0, 63])
    routing.set_task_ids(ids)
    ref = dear.double()
    xs = small.double()
    out_auto = ref(xs)
    ref.compute = "merged"
    assert torch.allclose(out_auto, ref(xs), atol=1e-10)


# -- storage: 4-D factorized lora_A, channels_last, legacy 5-D state dicts ----------------------------
@pytest.mark.parametrize("compute,route", [("auto", "ids"), ("merged", "ids"), ("auto", "softmax")])
@pytest.mark.parametrize("layout", ["kernel", "factorized"])
def test_channels_last_module_to_keeps_outputs(layout, compute, route):
    layer, routing = make_layer(nn.Conv2d(4, 6, 3, padding=1), layout, compute, rank=2)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, 7, 6, generator=gen, dtype=DT)
    ids = torch.tensor([2, 0, 2, 3, 1])
    w = torch.randn(5, E, generator=gen, dtype=DT).softmax(-1) if route == "softmax" else F.one_hot(ids, E).to(DT)
    if route == "softmax":
        routing.set_weights(w)
    else:
        routing.set_task_ids(ids)
    ref = hand_reference(layer, x, w)
    layer.to(memory_format=torch.channels_last)  # raised for the old 5-D factorized lora_A
    assert layer.base_layer.weight.is_contiguous(memory_format=torch.channels_last)
    if layout == "factorized":
        assert layer.lora_A.is_contiguous(memory_format=torch.channels_last) and not layer.lora_A.is_contiguous()
    out = layer(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, **TOL)
    assert (ref - hand_op(layer.base_layer, x, layer.base_layer.weight.detach())).abs().max() > 1e-3


def test_factorized_init_fan_in_is_one_expert():
    """kaiming-uniform(a=sqrt 5) bound is 1/sqrt(fan_in) with fan_in = Ci*kh*kw of one A_e (not kh*kw)."""
    torch.manual_seed(0)
    layer = MoLAConv2d(nn.Conv2d(8, 6, 3), 5, 4, layout="factorized")
    bound = 1 / (8 * 3 * 3) ** 0.5
    top = float(layer.lora_A.detach().abs().max())
    assert 0.9 * bound < top <= bound


def test_factorized_loads_legacy_5d_state_dict():
    """A state dict saved when the factorized lora_A was (E, r, Ci, kh, kw) loads into the 4-D storage."""
    layer, routing = make_layer(nn.Conv2d(4, 6, 3, padding=1), "factorized", "auto", rank=2)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["lora_A"] = state["lora_A"].view(E, 2, 4, 3, 3)
    fresh, _ = make_layer(nn.Conv2d(4, 6, 3, padding=1), "factorized", "auto", rank=2, seed=7)
    fresh.load_state_dict(state)
    assert fresh.lora_A.shape == (E * 2, 4, 3, 3)
    assert torch.equal(fresh.lora_A, layer.lora_A)
