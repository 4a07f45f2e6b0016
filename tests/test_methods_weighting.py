"""Loss-weighting methods: EW, RLW, DWA, GradNorm."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from mola.methods import StepContext, get_weighting

T = 3


def _ctx(losses: dict[int, Tensor], feats: Tensor | None = None, shared: list[nn.Parameter] | None = None,
         task: list[nn.Parameter] | None = None) -> StepContext:
    return StepContext(model=nn.Identity(), shared_params=shared or [], task_params=task or [],
                       task_ids=torch.zeros(1, dtype=torch.long), num_tasks=T, features=feats)


def _leaf_losses(values: list[float]) -> tuple[dict[int, Tensor], list[Tensor]]:
    leaves = [torch.tensor(v, requires_grad=True) for v in values]
    return {t: x for t, x in enumerate(leaves)}, leaves


def test_ew_is_the_plain_sum() -> None:
    losses, leaves = _leaf_losses([1.0, 2.0, 3.0])
    ew = get_weighting("ew", T)
    assert float(ew.combine(losses, _ctx(losses)).detach()) == 6.0
    ew.backward(losses, _ctx(losses))
    assert all(float(x.grad) == 1.0 for x in leaves)


def test_rlw_weights_sum_to_T_and_are_used() -> None:
    rlw = get_weighting("rlw", T, seed=3)
    for _ in range(20):
        w = rlw.sample_weights()
        assert w.shape == (T,) and torch.all(w > 0)
        assert abs(float(w.sum()) - T) < 1e-12
    losses, leaves = _leaf_losses([1.0, 2.0, 3.0])
    logs = rlw.backward(losses, _ctx(losses))
    assert abs(sum(logs.values()) - T) < 1e-9
    for t, x in enumerate(leaves):  # each loss's gradient is its weight
        assert abs(float(x.grad) - logs[f"w{t}"]) < 1e-6
    a, b = get_weighting("rlw", T, seed=1), get_weighting("rlw", T, seed=1)
    assert torch.equal(a.sample_weights(), b.sample_weights())


def test_dwa_weights() -> None:
    dwa = get_weighting("dwa", T, temperature=2.0)
    assert torch.equal(dwa.weights(), torch.ones(T, dtype=torch.float64))  # epoch 0
    dwa.on_epoch_end(0, {0: 1.0, 1: 2.0, 2: 4.0})
    assert torch.equal(dwa.weights(), torch.ones(T, dtype=torch.float64))  # epoch 1: still equal
    dwa.on_epoch_end(1, {0: 0.5, 1: 2.0, 2: 2.0})  # ratios 0.5, 1, 0.5
    w = dwa.weights()
    r = torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64)
    expected = T * torch.exp(r / 2) / torch.exp(r / 2).sum()
    torch.testing.assert_close(w, expected)
    assert abs(float(w.sum()) - T) < 1e-12
    losses, leaves = _leaf_losses([1.0, 1.0, 1.0])
    dwa.backward(losses, _ctx(losses))
    torch.testing.assert_close(torch.stack([x.grad for x in leaves]).double(), expected, atol=1e-6, rtol=0)
    dwa.on_epoch_end(2, {0: 0.25, 2: 1.0})  # task 1 missing from the epoch: ratio 1
    w = dwa.weights()
    assert torch.isfinite(w).all() and abs(float(w.sum()) - T) < 1e-12


def test_dwa_rejects_bad_temperature() -> None:
    with pytest.raises(ValueError, match="temperature"):
        get_weighting("dwa", T, temperature=0.0)


def _gradnorm_problem(seed: int = 0) -> tuple[nn.Linear, nn.ModuleList, Tensor, Tensor]:
    torch.manual_seed(seed)
    enc = nn.Linear(4, 5)
    heads = nn.ModuleList([nn.Linear(5, 1) for _ in range(T)])
    x = torch.randn(16, 4)
    y = torch.randn(16, T) * torch.tensor([1.0, 5.0, 0.2])  # very different task scales
    return enc, heads, x, y


@pytest.mark.parametrize("wrt", ["features", "last_shared"])
def test_gradnorm_weights_positive_and_sum_to_T(wrt: str) -> None:
    enc, heads, x, y = _gradnorm_problem()
    gn = get_weighting("gradnorm", T, alpha=1.5, wrt=wrt)
    params = list(enc.parameters()) + list(heads.parameters()) + list(gn.parameters())
    opt = torch.optim.SGD(params, lr=0.05)
    for _ in range(30):
        feats = torch.tanh(enc(x))
        losses = {t: (heads[t](feats).squeeze(1) - y[:, t]).pow(2).mean() for t in range(T)}
        ctx = _ctx(losses, feats, list(enc.parameters()), list(heads.parameters()) + list(gn.parameters()))
        opt.zero_grad(set_to_none=True)
        logs = gn.backward(losses, ctx)
        assert abs(sum(logs.values()) - T) < 1e-5 and min(logs.values()) > 0
        assert gn.task_weights.grad is not None and torch.isfinite(gn.task_weights.grad).all()
        opt.step()
        w = gn.weights()
        assert torch.all(w > 0) and abs(float(w.sum()) - T) < 1e-5
    assert not torch.allclose(gn.weights(), torch.ones(T))  # the weights did move


def test_gradnorm_weight_gradient_by_hand() -> None:
    # two tasks with losses a * <v, z> and b * <v, z>: ||grad_z L_t|| = |a| ||v||, same training rate
    gn = get_weighting("gradnorm", 2, alpha=1.5)
    z = torch.ones(3, requires_grad=True)
    v = torch.tensor([1.0, 2.0, 2.0])  # ||v|| = 3
    feats = z * 1.0
    losses = {0: 1.0 * (v * feats).sum(), 1: 2.0 * (v * feats).sum()}
    ctx = StepContext(model=nn.Identity(), shared_params=[], task_params=[], task_ids=torch.zeros(1).long(),
                      num_tasks=2, features=feats)
    gn.backward(losses, ctx)
    # G = (3, 6), target = mean(G) * 1 = 4.5: d/dw |w_t n_t - 4.5| = sign(G_t - 4.5) * n_t = (-3, +6)
    torch.testing.assert_close(gn.task_weights.grad, torch.tensor([-3.0, 6.0]))
    assert math.isclose(float(gn.initial_losses[0]), 5.0)  # first observed loss: <v, 1> = 5
