"""Gradient aggregators against torchjd 0.18.0 (an independent implementation used only as a test oracle).

Scaling conventions compared (ours vs torchjd):
- MGDA, IMTL-G, GradDrop, Nash-MTL (max_norm=0): same vector.
- PCGrad, GradVac: both return the SUM of the modified gradients; torchjd draws its task orders with the
  global ``torch.randperm``, so both sides are compared with ``torch.randperm`` patched to the identity order.
- Aligned-MTL: torchjd's default preference vector is 1/T (mean); ours is all ones (sum) -> ours = T * theirs.
- CAGrad: torchjd returns the unscaled d = g0 + (r / ||g_w||) g_w -> compared with our ``rescale=0``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

torchjd = pytest.importorskip("torchjd")
from torchjd import aggregation as tjd  # noqa: E402

from mola.methods.gradient import aligned_mtl, cagrad, graddrop, gradvac, imtl, mgda, nash_mtl, pcgrad  # noqa: E402

CASES = [(T, D, seed) for T in (2, 3, 5) for D in (10, 50) for seed in (0, 1)]


def _G(T: int, D: int, seed: int) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture
def identity_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "randperm", lambda n, **kw: torch.arange(n))


@pytest.mark.parametrize("T,D,seed", CASES)
def test_mgda_vs_torchjd(T: int, D: int, seed: int) -> None:
    # torchjd runs Frank-Wolfe (approximate); for the exact min-norm point a of a convex set and any point b
    # of it, ||b - a||^2 <= ||b||^2 - ||a||^2, which bounds the distance by the oracle's suboptimality.
    G = _G(T, D, seed)
    ours = mgda.aggregate(G)
    theirs = tjd.MGDA(epsilon=1e-12, max_iters=20000)(G)
    assert ours.norm() <= theirs.norm() + 1e-12
    assert (theirs - ours).norm() ** 2 <= theirs.norm() ** 2 - ours.norm() ** 2 + 1e-12
    torch.testing.assert_close(ours, theirs, atol=5e-3, rtol=0)


@pytest.mark.parametrize("T,D,seed", CASES)
def test_imtl_g_vs_torchjd(T: int, D: int, seed: int) -> None:
    G = _G(T, D, seed)
    torch.testing.assert_close(imtl.aggregate(G), tjd.IMTLG()(G), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("T,D,seed", CASES)
def test_aligned_mtl_vs_torchjd(T: int, D: int, seed: int) -> None:
    G = _G(T, D, seed)
    torch.testing.assert_close(aligned_mtl.aggregate(G), T * tjd.AlignedMTL()(G), atol=1e-10, rtol=1e-10)
    # "median" only for odd T: for an even count torch.median (torchjd) takes the lower middle value, we average
    for mode in ("rmse", "median") if T % 2 else ("rmse",):
        torch.testing.assert_close(aligned_mtl.aggregate(G, scale_mode=mode),
                                   T * tjd.AlignedMTL(scale_mode=mode)(G), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("T,D,seed", CASES)
def test_pcgrad_vs_torchjd(T: int, D: int, seed: int, identity_order: None) -> None:
    G = _G(T, D, seed)
    torch.testing.assert_close(pcgrad.aggregate(G), tjd.PCGrad()(G), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("T,D,seed", CASES)
def test_gradvac_vs_torchjd_over_steps(T: int, D: int, seed: int, identity_order: None) -> None:
    theirs = tjd.GradVac(beta=0.5, eps=1e-8)
    targets = torch.zeros(T, T, dtype=torch.float64)
    for step in range(4):  # the EMA targets evolve identically
        G = _G(T, D, 100 * seed + step)
        torch.testing.assert_close(gradvac.aggregate(G, targets=targets, beta=0.5, eps=1e-8), theirs(G),
                                   atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("T,D,seed", CASES)
def test_graddrop_vs_torchjd(T: int, D: int, seed: int) -> None:
    G = _G(T, D, seed)
    torch.manual_seed(seed)
    theirs = tjd.GradDrop()(G)  # draws U = torch.rand(D) from the global generator
    torch.manual_seed(seed)
    u = torch.rand(D, dtype=torch.float64)
    torch.testing.assert_close(graddrop.aggregate(G, u=u), theirs, atol=1e-12, rtol=0)
    leak = torch.linspace(0.1, 0.9, T, dtype=torch.float64)
    torch.manual_seed(seed)
    theirs = tjd.GradDrop(leak=leak)(G)
    torch.testing.assert_close(graddrop.aggregate(G, leak=leak, u=u), theirs, atol=1e-12, rtol=0)


@pytest.mark.parametrize("T,D,seed", CASES)
def test_cagrad_vs_torchjd(T: int, D: int, seed: int) -> None:
    pytest.importorskip("cvxpy")
    pytest.importorskip("clarabel")
    G = _G(T, D, seed)
    theirs = tjd.CAGrad(c=0.4)(G)
    ours = cagrad.aggregate(G, c=0.4, rescale=0)
    # clarabel's interior-point answer is accurate to ~1e-6; ours is exact (checked against SLSQP elsewhere)
    assert (ours - theirs).norm() <= 1e-4 * ours.norm()


@pytest.mark.parametrize("T,D,seed", CASES)
def test_nash_mtl_vs_torchjd(T: int, D: int, seed: int) -> None:
    pytest.importorskip("cvxpy")
    pytest.importorskip("ecos")
    G = _G(T, D, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = tjd.NashMTL(n_tasks=T, max_norm=0.0, optim_niter=200)(G)
    ours = nash_mtl.aggregate(G)
    alpha = nash_mtl.weights(G)
    # exact up to the 1e-8 relative ridge
    torch.testing.assert_close((G @ ours) * alpha, torch.ones(T, dtype=torch.float64), atol=1e-6, rtol=0)
    # torchjd's CCP/ECOS loop silently falls back to all-ones weights when ECOS fails; compare only when its
    # answer is itself a Nash solution (weights recovered from G^T alpha = d by least squares)
    alpha_t = torch.linalg.lstsq(G.T, theirs.unsqueeze(1)).solution.squeeze(1)
    if torch.allclose((G @ theirs) * alpha_t, torch.ones(T, dtype=torch.float64), atol=1e-3):
        assert (ours - theirs).norm() <= 1e-5 * ours.norm()
    else:  # (T=3, D=10, seed 0 with ECOS 2.0.14): torchjd returned its fallback, the plain sum; ours solved it
        torch.testing.assert_close(theirs, G.sum(0), atol=1e-12, rtol=0)
