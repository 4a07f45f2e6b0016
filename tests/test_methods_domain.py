"""Domain methods on hand-computed cases: MMD, EQRM, DANN gradient reversal, SelfReg."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import Tensor, nn

from mola.methods import StepContext, get_domain_method
from mola.methods.domain import dann, eqrm, mmd_aae, selfreg

F64 = torch.float64


def _ctx(feats: Tensor, ids: Tensor, outputs: dict | None = None, targets: object = None) -> StepContext:
    return StepContext(model=nn.Identity(), shared_params=[], task_params=[], task_ids=ids,
                       num_tasks=int(ids.max()) + 1, features=feats, outputs=outputs or {}, targets=targets)


# -- MMD ------------------------------------------------------------------------------------------------
def test_mmd_single_points_single_bandwidth() -> None:
    x = torch.tensor([[1.0, 2.0]], dtype=F64)
    y = torch.tensor([[0.0, 0.5]], dtype=F64)
    s = 1.5
    d2 = 1.0 + 2.25
    expected = 2 - 2 * math.exp(-d2 / (2 * s * s))
    assert abs(float(mmd_aae.mmd2(x, y, [s])) - expected) < 1e-12


def test_mmd_kernel_mixture_and_pairs() -> None:
    x = torch.tensor([[0.0], [1.0]], dtype=F64)
    y = torch.tensor([[3.0]], dtype=F64)
    sig = [1.0, 2.0]

    def k(a: float, b: float) -> float:
        return sum(math.exp(-(a - b) ** 2 / (2 * s * s)) for s in sig) / len(sig)

    kxx = (k(0, 0) + k(0, 1) + k(1, 0) + k(1, 1)) / 4
    expected = kxx + k(3, 3) - 2 * (k(0, 3) + k(1, 3)) / 2
    assert abs(float(mmd_aae.mmd2(x, y, sig)) - expected) < 1e-12
    # three domains: the mean over the three pairs
    feats = torch.tensor([[0.0], [1.0], [3.0], [5.0]], dtype=F64)
    ids = torch.tensor([0, 0, 1, 2])
    groups = [feats[:2], feats[2:3], feats[3:]]
    pairs = [mmd_aae.mmd2(groups[i], groups[j], sig) for i, j in ((0, 1), (0, 2), (1, 2))]
    torch.testing.assert_close(mmd_aae.pairwise_mmd(feats, ids, sig), torch.stack(pairs).mean())
    assert float(mmd_aae.pairwise_mmd(feats[:2], ids[:2], sig)) == 0.0  # one domain: no pair


def test_mmd_aae_combine_adds_weighted_mmd() -> None:
    feats = torch.tensor([[1.0, 2.0], [0.0, 0.5]], dtype=F64, requires_grad=True)
    ids = torch.tensor([0, 1])
    m = get_domain_method("mmd_aae", 2, bandwidths=[1.5], mmd_weight=0.3)
    losses = {0: torch.tensor(1.0, dtype=F64), 1: torch.tensor(2.0, dtype=F64)}
    total = m.combine(losses, _ctx(feats, ids))
    assert abs(float(total.detach()) - (3.0 + 0.3 * (2 - 2 * math.exp(-3.25 / 4.5)))) < 1e-12


# -- EQRM -----------------------------------------------------------------------------------------------
def test_eqrm_empirical_quantile() -> None:
    risks = torch.tensor([4.0, 1.0, 3.0, 2.0], dtype=F64, requires_grad=True)
    m = get_domain_method("eqrm", 4, alpha=0.75, kde=False)
    q = m.objective(risks)
    assert abs(float(q.detach()) - 3.25) < 1e-12  # sorted 1 2 3 4, position 0.75 * 3 = 2.25
    q.backward()
    torch.testing.assert_close(risks.grad, torch.tensor([0.25, 0.0, 0.75, 0.0], dtype=F64))


def test_eqrm_kde_quantile_and_its_gradient() -> None:
    r = torch.tensor([0.3, 0.9, 0.5, 1.4, 0.7], dtype=F64, requires_grad=True)
    h = 0.2
    q = eqrm.kde_quantile(r, 0.8, bandwidth=h)
    cdf = norm.cdf((float(q.detach()) - r.detach().numpy()) / h).mean()
    assert abs(cdf - 0.8) < 1e-10
    q.backward()
    # implicit function theorem vs a finite difference of the quantile itself
    eps = 1e-6
    for i in range(5):
        rp = r.detach().clone()
        rp[i] += eps
        rm = r.detach().clone()
        rm[i] -= eps
        up, down = eqrm.kde_quantile(rp, 0.8, bandwidth=h), eqrm.kde_quantile(rm, 0.8, bandwidth=h)
        fd = float(up - down) / (2 * eps)
        assert abs(float(r.grad[i]) - fd) < 1e-6
    assert abs(float(r.grad.sum()) - 1.0) < 1e-12


def test_eqrm_burnin_then_quantile() -> None:
    m = get_domain_method("eqrm", 3, alpha=0.9, burnin=2, kde=False, reduction="sum")
    losses = {0: torch.tensor(1.0), 1: torch.tensor(2.0), 2: torch.tensor(6.0)}
    ctx = _ctx(torch.zeros(3, 1), torch.arange(3))
    assert abs(float(m.combine(losses, ctx)) - 9.0) < 1e-6  # 3 * mean
    assert abs(float(m.combine(losses, ctx)) - 9.0) < 1e-6
    q = float(np.quantile([1.0, 2.0, 6.0], 0.9))
    assert abs(float(m.combine(losses, ctx)) - 3 * q) < 1e-5
    assert int(m.steps) == 3


def test_eqrm_silverman_and_degenerate() -> None:
    r = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    std, iqr = float(r.std()), 1.5
    assert abs(eqrm.silverman_bandwidth(r) - 0.9 * min(std, iqr / 1.34) * 4 ** -0.2) < 1e-12
    same = torch.full((3,), 2.0, dtype=F64)
    assert float(eqrm.kde_quantile(same, 0.7)) == 2.0


# -- DANN -----------------------------------------------------------------------------------------------
def test_grad_reverse_flips_the_gradient() -> None:
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    w = torch.randn(3, dtype=F64)
    (dann.grad_reverse(x, 0.7) @ w).sum().backward()
    torch.testing.assert_close(x.grad, -0.7 * w.expand(4, 3))


def test_dann_reversal_reaches_features_but_not_the_discriminator() -> None:
    torch.manual_seed(0)
    m = get_domain_method("dann", 2, feature_dim=3, lam=0.5).double()
    feats = torch.randn(6, 3, dtype=F64, requires_grad=True)
    ids = torch.tensor([0, 1, 0, 1, 0, 1])
    ctx = _ctx(feats, ids)
    dom = m.domain_loss(ctx)
    g_feat, *g_disc = torch.autograd.grad(dom, [feats, *m.discriminator.parameters()])
    # the same loss without reversal
    plain = nn.functional.cross_entropy(m.discriminator(feats), ids)
    p_feat, *p_disc = torch.autograd.grad(plain, [feats, *m.discriminator.parameters()])
    torch.testing.assert_close(g_feat, -0.5 * p_feat)
    for a, b in zip(g_disc, p_disc, strict=True):
        torch.testing.assert_close(a, b)
    losses = {0: torch.tensor(1.0, dtype=F64), 1: torch.tensor(0.5, dtype=F64)}
    torch.testing.assert_close(m.combine(losses, ctx), 1.5 + plain)


# -- SelfReg --------------------------------------------------------------------------------------------
def _selfreg_case(identical: bool) -> tuple[StepContext, Tensor]:
    ids = torch.tensor([0, 1, 0, 1, 2, 2])
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    proto = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.0, 2.0]], dtype=F64)
    feats = proto[labels].clone()
    if not identical:
        feats = feats + 0.1 * torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    feats.requires_grad_(True)
    logits = feats @ torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=F64)
    outputs = {t: logits[ids == t] for t in range(3)}
    targets = {t: labels[ids == t] for t in range(3)}
    return _ctx(feats, ids, outputs, targets), feats


@pytest.mark.parametrize("cdpl", [True, False])
def test_selfreg_zero_for_identical_same_class_features(cdpl: bool) -> None:
    m = get_domain_method("selfreg", 3, feature_dim=3, cdpl=cdpl, seed=0).double()
    ctx, _ = _selfreg_case(identical=True)
    assert float(m.regulariser(ctx).detach()) == 0.0
    ctx, feats = _selfreg_case(identical=False)
    reg = m.regulariser(ctx)
    assert float(reg.detach()) > 0
    reg.backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()


def test_selfreg_partners_share_the_class() -> None:
    labels = torch.tensor([0, 1, 1, 2, 0, 1, 2, 2, 3])
    j = selfreg.same_class_partners(labels, torch.Generator().manual_seed(1))
    assert torch.equal(labels[j], labels)
    assert sorted(j.tolist()) == list(range(9))  # a permutation within classes
    assert int(j[8]) == 8  # alone in its class: paired with itself


def test_selfreg_needs_class_targets() -> None:
    m = get_domain_method("selfreg", 2, feature_dim=2, seed=0)
    ctx = _ctx(torch.zeros(2, 2), torch.tensor([0, 1]), targets={0: torch.zeros(1, 2), 1: torch.zeros(1, 2)})
    with pytest.raises(ValueError, match="class-index"):
        m.regulariser(ctx)
