"""Gradient aggregators on hand-derived cases and properties (no third-party oracle needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from mola.methods.gradient import (
    _solvers,
    aligned_mtl,
    cagrad,
    graddrop,
    gradvac,
    imtl,
    mgda,
    moco,
    nash_mtl,
    pcgrad,
)

F64 = torch.float64
A, B = 3.0, 2.0
ORTHO = torch.tensor([[A, 0.0], [0.0, B]], dtype=F64)  # two orthogonal gradients of different norms
G0 = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
OPPOSITE = torch.stack([G0, -G0])
IDENTICAL = torch.stack([G0, G0])


def t64(x: object) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def _G(T: int, D: int, seed: int) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed), dtype=F64)


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-10) -> None:
    torch.testing.assert_close(a, b.to(a), atol=atol, rtol=0)


# -- MGDA -----------------------------------------------------------------------------------------------
def test_mgda_hand_cases() -> None:
    # min-norm point of the segment [A e1, B e2]: alpha proportional to (1/A^2, 1/B^2)
    s = A * A + B * B
    close(mgda.aggregate(ORTHO), t64([A * B * B / s, B * A * A / s]))
    close(mgda.aggregate(OPPOSITE), torch.zeros(3))
    close(mgda.aggregate(IDENTICAL), G0)
    close(mgda.aggregate(ORTHO, normalize="l2"), t64([0.5, 0.5]))  # unit rows e1, e2


def _grid_min_norm(G: torch.Tensor, levels: int = 8) -> float:
    """Brute force: min ||alpha @ G|| over a grid on the simplex, zoomed around the best point."""
    T = G.shape[0]
    K = (G @ G.T).numpy()
    center, half, n = np.full(T - 1, 0.5), 0.5, 400 if T == 2 else 300
    best = math.inf
    for _ in range(levels):
        axes = [np.linspace(max(c - half, 0.0), min(c + half, 1.0), n + 1) for c in center]
        pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, T - 1)
        pts = pts[pts.sum(1) <= 1.0 + 1e-15]
        alpha = np.concatenate([pts, 1.0 - pts.sum(1, keepdims=True)], 1).clip(0.0)
        vals = np.einsum("ni,ij,nj->n", alpha, K, alpha)
        i = int(np.argmin(vals))
        best = min(best, float(np.sqrt(max(vals[i], 0.0))))
        center, half = pts[i], 4.0 * half / n
    return best


@pytest.mark.parametrize("T,seed", [(2, s) for s in range(4)] + [(3, s) for s in range(4)])
def test_mgda_is_min_norm_point_against_grid(T: int, seed: int) -> None:
    G = _G(T, 12, seed)
    if seed % 2:  # also cases where the min-norm point is a vertex or on an edge
        G[0] = 0.2 * G[1] + 0.05 * G[0]
    ours = float(mgda.aggregate(G).norm())
    grid = _grid_min_norm(G)
    assert ours <= grid + 1e-12
    assert grid - ours <= 1e-6
    w = mgda.weights(G)
    assert torch.all(w >= 0) and abs(float(w.sum()) - 1.0) < 1e-12


def test_mgda_wolfe_handles_many_tasks_and_duplicates() -> None:
    G = _G(8, 5, 3)  # T > D: the hull may contain 0
    G = torch.cat([G, G[:2]])  # duplicate rows
    w = mgda.weights(G)
    d = w @ G
    # optimality on the simplex: <g_i, d> >= ||d||^2 for every row
    assert float((G @ d).min()) >= float(d @ d) - 1e-10


# -- PCGrad ---------------------------------------------------------------------------------------------
def test_pcgrad_hand_cases() -> None:
    close(pcgrad.aggregate(ORTHO), ORTHO.sum(0))  # no conflict: the plain sum
    close(pcgrad.aggregate(OPPOSITE), torch.zeros(3))  # each projected onto the other's normal plane: 0
    close(pcgrad.aggregate(IDENTICAL), 2 * G0)
    g1, g2 = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([-1.0, 1.0], dtype=F64)
    # g1' = g1 - (g1.g2/|g2|^2) g2 = (0.5, 0.5); g2' = g2 - (g2.g1/|g1|^2) g1 = (0, 1)
    close(pcgrad.aggregate(torch.stack([g1, g2])), t64([0.5, 1.5]))


@pytest.mark.parametrize("seed", range(20))
def test_pcgrad_two_tasks_never_conflicts(seed: int) -> None:
    G = _G(2, 10, seed)
    d = pcgrad.aggregate(G)
    assert float(G[0] @ d) >= -1e-12 and float(G[1] @ d) >= -1e-12


def test_pcgrad_generator_is_deterministic() -> None:
    G = _G(5, 20, 0)
    a = pcgrad.aggregate(G, generator=torch.Generator().manual_seed(7))
    b = pcgrad.aggregate(G, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


# -- IMTL-G ---------------------------------------------------------------------------------------------
def test_imtl_hand_cases() -> None:
    # d = (k, k) with alpha_1 A = alpha_2 B = k and alpha_1 + alpha_2 = 1: k = AB / (A + B)
    k = A * B / (A + B)
    close(imtl.aggregate(ORTHO), t64([k, k]))
    close(imtl.aggregate(IDENTICAL), G0)
    close(imtl.aggregate(OPPOSITE), torch.zeros(3))


@pytest.mark.parametrize("T,seed", [(2, 0), (3, 1), (5, 2)])
def test_imtl_equal_projections(T: int, seed: int) -> None:
    G = _G(T, 30, seed)
    d = imtl.aggregate(G)
    proj = (G / G.norm(dim=1, keepdim=True)) @ d
    close(proj, proj.mean().expand(T), atol=1e-10)
    close(imtl.weights_from_gram(_solvers.gram(G)).sum() * torch.ones(()), torch.ones((), dtype=F64))


# -- Nash-MTL -------------------------------------------------------------------------------------------
def test_nash_hand_cases() -> None:
    close(nash_mtl.aggregate(ORTHO), t64([1.0, 1.0]), atol=1e-7)  # alpha_t = 1 / ||g_t||
    n = float(G0.norm())  # identical: alpha = 1 / (sqrt(2) n) each, d = sqrt(2) g / n
    close(nash_mtl.aggregate(IDENTICAL), math.sqrt(2) * G0 / n, atol=1e-6)
    close(nash_mtl.aggregate(OPPOSITE), torch.zeros(3), atol=1e-6)  # no bargaining solution: no move


@pytest.mark.parametrize("T,seed", [(2, 0), (3, 1), (5, 2)])
def test_nash_solves_the_bargaining_equation(T: int, seed: int) -> None:
    G = _G(T, 40, seed)
    alpha = nash_mtl.weights(G)
    assert torch.all(alpha > 0)
    close((G @ G.T @ alpha) * alpha, torch.ones(T), atol=1e-6)
    d = nash_mtl.aggregate(G, max_norm=0.5)
    assert float(d.norm()) <= 0.5 + 1e-12


# -- Aligned-MTL ----------------------------------------------------------------------------------------
def test_aligned_mtl_hand_cases() -> None:
    # singular values A > B are both set to B: aligned rows B e1, B e2, summed
    close(aligned_mtl.aggregate(ORTHO), t64([B, B]))
    close(aligned_mtl.aggregate(IDENTICAL), 2 * G0)  # rank 1: nothing to align
    close(aligned_mtl.aggregate(OPPOSITE), torch.zeros(3))


@pytest.mark.parametrize("T,seed", [(2, 0), (3, 1), (5, 2)])
def test_aligned_mtl_condition_number_one(T: int, seed: int) -> None:
    G = _G(T, 25, seed)
    Bm = np.stack([aligned_mtl.weights_from_gram(_solvers.gram(G), e) for e in np.eye(T)], 1)
    # independent reference: with G = U S V^T (thin SVD) the aligned gradients are sigma_min * U V^T
    U, S, Vt = np.linalg.svd(G.numpy(), full_matrices=False)
    np.testing.assert_allclose(Bm @ G.numpy(), S.min() * U @ Vt, atol=1e-10)
    sv = np.linalg.svd(Bm @ G.numpy(), compute_uv=False)
    np.testing.assert_allclose(sv, np.full(T, sv.min()), rtol=1e-8)
    np.testing.assert_allclose(sv.min(), np.linalg.svd(G.numpy(), compute_uv=False).min(), rtol=1e-8)


# -- GradVac --------------------------------------------------------------------------------------------
def test_gradvac_first_step_is_pcgrad_and_reaches_target() -> None:
    close(gradvac.aggregate(OPPOSITE), torch.zeros(3))
    close(gradvac.aggregate(ORTHO), ORTHO.sum(0))
    g1, g2 = torch.tensor([1.0, 0.2], dtype=F64), torch.tensor([0.1, 1.0], dtype=F64)
    targets = torch.full((2, 2), 0.8, dtype=F64)  # cos(g1, g2) ~ 0.29 < 0.8: both get raised to 0.8
    G = torch.stack([g1, g2])
    c = gradvac.weights(_solvers.gram(G), targets.numpy().copy(), beta=0.5, eps=0.0)
    d = torch.from_numpy(c) @ G
    cos = float(torch.nn.functional.cosine_similarity(G[0], G[1], dim=0))

    def raised(gi: torch.Tensor, gj: torch.Tensor) -> torch.Tensor:
        """The paper's closed form: gi + w gj has cosine 0.8 with gj (checked below, independently of mola)."""
        w = float(gi.norm()) * (0.8 * math.sqrt(1 - cos**2) - cos * 0.6) / (float(gj.norm()) * 0.6)
        out = gi + w * gj
        assert abs(float(torch.nn.functional.cosine_similarity(out, gj, dim=0)) - 0.8) < 1e-12
        return out

    close(d, raised(g1, g2) + raised(g2, g1), atol=1e-12)  # each task raised against the other's original
    tgt = targets.clone()
    gradvac.aggregate(G, targets=tgt, beta=0.5)
    close(tgt[0, 1], t64(0.5 * 0.8 + 0.5 * cos), atol=1e-8)


# -- GradDrop -------------------------------------------------------------------------------------------
def test_graddrop_hand_cases() -> None:
    u = torch.tensor([0.1, 0.6, 0.9], dtype=F64)
    close(graddrop.aggregate(IDENTICAL, u=u), 2 * G0)  # pure signs: everything kept
    # opposite: purity 1/2 everywhere; U < 1/2 keeps the positive entry, U > 1/2 the negative one
    close(graddrop.aggregate(OPPOSITE, u=u), torch.where(u < 0.5, G0.abs(), -G0.abs()))
    close(graddrop.aggregate(OPPOSITE, leak=1.0, u=u), torch.zeros(3))  # full leak = plain sum
    # batch-separated rows: task 0 owns row 0, task 1 row 1 of a (2 x 3) representation
    G = torch.zeros(2, 6, dtype=F64)
    G[0, :3], G[1, 3:] = G0, -G0
    d = graddrop.aggregate(G, u=u, batch_size=2)
    keep_pos = (u < 0.5).to(F64)
    expect0 = G0 * torch.where(G0 > 0, keep_pos, 1 - keep_pos)
    expect1 = -G0 * torch.where(-G0 > 0, keep_pos, 1 - keep_pos)
    close(d, torch.cat([expect0, expect1]))


# -- CAGrad ---------------------------------------------------------------------------------------------
def test_cagrad_hand_cases() -> None:
    c = 0.4
    close(cagrad.aggregate(IDENTICAL, c=c, rescale=0), (1 + c) * G0)
    close(cagrad.aggregate(IDENTICAL, c=c, rescale=1), (1 + c) / (1 + c * c) * G0)
    close(cagrad.aggregate(IDENTICAL, c=c, rescale=2), G0)
    e = torch.eye(2, dtype=F64)  # symmetric: w = (1/2, 1/2), g_w = g0, d = (1 + c) g0
    close(cagrad.aggregate(e, c=c, rescale=0), (1 + c) * t64([0.5, 0.5]))
    close(cagrad.aggregate(ORTHO, c=0.0, rescale=0), ORTHO.mean(0))  # c = 0: the mean gradient


@pytest.mark.parametrize("T,D,seed", [(2, 10, 0), (3, 20, 1), (5, 50, 2), (5, 10, 3)])
def test_cagrad_dual_against_slsqp(T: int, D: int, seed: int) -> None:
    G = _G(T, D, seed)
    c = 0.4
    K = (G @ G.T).numpy()
    g0 = np.full(T, 1.0 / T)
    b, r = K @ g0, c * math.sqrt(g0 @ K @ g0)

    def f(w: np.ndarray) -> float:
        return float(w @ b + r * math.sqrt(max(w @ K @ w, 0.0)))

    res = minimize(f, g0, method="SLSQP", bounds=[(0, 1)] * T,
                   constraints={"type": "eq", "fun": lambda w: w.sum() - 1}, options={"ftol": 1e-15, "maxiter": 500})
    w_ref = np.clip(res.x, 0, None)
    gw = math.sqrt(w_ref @ K @ w_ref)
    ref = torch.from_numpy(g0 + r / gw * w_ref) @ G
    ours = cagrad.aggregate(G, c=c, rescale=0)
    assert (ours - ref).norm() <= 1e-5 * ref.norm()
    # primal check: d is in the ball around g0 and improves the worst task at least as much as SLSQP's
    g0v = G.mean(0)
    assert float((ours - g0v).norm()) <= c * float(g0v.norm()) + 1e-10
    assert float((G @ ours).min()) >= float((G @ ref).min()) - 1e-9


# -- MoCo -----------------------------------------------------------------------------------------------
def test_moco_hand_case() -> None:
    e = torch.eye(2, dtype=F64)
    close(moco.aggregate(e), t64([0.5, 0.5]))  # Y = G, lam stays uniform by symmetry
    close(moco.aggregate(IDENTICAL), G0)  # any lam on the simplex gives g


@pytest.mark.parametrize("T,D", [(2, 10), (3, 30), (5, 50)])
def test_moco_against_reference_steps(T: int, D: int) -> None:
    # three steps against the paper's update equations written out in NumPy
    y = torch.zeros(0)
    lam = torch.full((T,), 1.0 / T, dtype=F64)
    y_ref, lam_ref = None, np.full(T, 1.0 / T)
    beta, gamma, rho = 0.3, 0.05, 0.1
    for step in range(3):
        G = _G(T, D, 10 + step)
        if step == 0:
            y = G.clone()  # the tracker starts at the first gradient
            y_ref = G.numpy().copy()
        d = moco.aggregate(G, y=y, lam=lam, beta=beta, gamma=gamma, rho=rho)
        y_ref = y_ref - beta * (y_ref - G.numpy())
        v = lam_ref - gamma * (y_ref @ y_ref.T + rho * np.eye(T)) @ lam_ref
        # projection onto the simplex by bisection on the threshold (independent of the sort-based one)
        lo, hi = v.min() - 1.0, v.max()
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if np.clip(v - mid, 0, None).sum() > 1 else (lo, mid)
        lam_ref = np.clip(v - 0.5 * (lo + hi), 0, None)
        np.testing.assert_allclose(y.numpy(), y_ref, atol=1e-12)
        np.testing.assert_allclose(lam.numpy(), lam_ref, atol=1e-9)
        np.testing.assert_allclose(d.numpy(), y_ref.T @ lam_ref, atol=1e-8)


# -- solvers --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_project_simplex(seed: int) -> None:
    v = np.random.default_rng(seed).normal(size=6) * 2
    p = _solvers.project_simplex(v)
    assert abs(p.sum() - 1) < 1e-12 and (p >= 0).all()
    # optimality: no simplex vertex mixture is closer (check against random simplex points)
    pts = np.random.default_rng(seed + 1).dirichlet(np.ones(6), size=2000)
    assert np.linalg.norm(v - p) <= np.linalg.norm(v - pts, axis=1).min() + 1e-12


def test_every_aggregator_returns_one_vector() -> None:
    G = _G(3, 11, 0)
    for fn in (mgda.aggregate, pcgrad.aggregate, imtl.aggregate, nash_mtl.aggregate, aligned_mtl.aggregate,
               gradvac.aggregate, graddrop.aggregate, cagrad.aggregate, moco.aggregate):
        out = fn(G)
        assert out.shape == (11,) and out.dtype == F64 and torch.isfinite(out).all(), fn.__module__
    for fn in (mgda.aggregate, imtl.aggregate, cagrad.aggregate, aligned_mtl.aggregate):
        assert fn(G.float()).dtype == torch.float32
