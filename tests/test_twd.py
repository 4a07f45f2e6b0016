"""Task-wise Decorrelation loss (method.md §5) against a plain double-loop implementation."""

from __future__ import annotations

import math

import pytest
import torch

from mola.layers import twd_loss

TOL = {"rtol": 0.0, "atol": 1e-10}


def loop_twd(z: torch.Tensor, task_ids: torch.Tensor, tau: float) -> float:
    """L = 1/|P| sum_{(i,j) in P} -log(S_ij / sum_{k != i} S_ik), S_ij = exp(u_i.u_j / tau), plain python."""
    rows = [[float(v) for v in row] for row in z]
    ids = [int(t) for t in task_ids]
    units = []
    for row in rows:
        norm = math.sqrt(sum(v * v for v in row))
        units.append([v / norm for v in row])

    def s(i: int, j: int) -> float:
        return math.exp(sum(a * b for a, b in zip(units[i], units[j], strict=True)) / tau)

    n = len(rows)
    total, pairs = 0.0, 0
    for i in range(n):
        denom = sum(s(i, k) for k in range(n) if k != i)
        for j in range(n):
            if j != i and ids[i] == ids[j]:
                total += -math.log(s(i, j) / denom)
                pairs += 1
    return total / pairs if pairs else 0.0


CASES = [(seed, b, t) for seed, (b, t) in enumerate([(2, 1), (4, 2), (7, 3), (12, 4), (9, 9 - 1), (16, 2)])]


@pytest.mark.parametrize("tau", [0.07, 0.5, 1.0, 2.5])
@pytest.mark.parametrize("seed,batch,tasks", CASES)
def test_twd_matches_double_loop(seed, batch, tasks, tau):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 6, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, tasks, (batch,), generator=gen)
    if batch >= 2:
        ids[1] = ids[0]  # at least one positive pair
    out = twd_loss(z, ids, tau)
    assert out.dim() == 0
    torch.testing.assert_close(out, torch.tensor(loop_twd(z, ids, tau), dtype=torch.float64), **TOL)


def test_twd_default_tau_is_one():
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(8, 32, generator=gen, dtype=torch.float64)
    ids = torch.tensor([0, 1, 0, 2, 1, 1, 2, 0])
    torch.testing.assert_close(twd_loss(z, ids), torch.tensor(loop_twd(z, ids, 1.0), dtype=z.dtype), **TOL)


def test_twd_positive_pairs_pulled_together_lower_loss():
    ids = torch.tensor([0, 0, 1, 1])
    grouped = torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0], [-1.0, 0.1]], dtype=torch.float64)
    mixed = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [1.0, 0.1], [-1.0, 0.0]], dtype=torch.float64)
    assert twd_loss(grouped, ids) < twd_loss(mixed, ids)


@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_twd_invariant_to_scaling(tau):
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(10, 8, generator=gen, dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3])
    torch.testing.assert_close(twd_loss(7.3 * z, ids, tau), twd_loss(z, ids, tau), **TOL)


@pytest.mark.parametrize("ids", [[0, 1, 2, 3], [5], [2, 0]], ids=["distinct", "single", "two_distinct"])
def test_twd_no_positive_pair_is_zero_with_zero_grad(ids):
    ids = torch.tensor(ids)
    z = torch.randn(len(ids), 5, dtype=torch.float64, requires_grad=True)
    out = twd_loss(z, ids)
    assert not torch.isnan(out)
    assert out.item() == 0.0
    out.backward()
    assert z.grad is not None
    assert torch.isfinite(z.grad).all()
    assert torch.count_nonzero(z.grad) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_twd_large_inputs_finite(dtype):
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(12, 16, generator=gen, dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, 3] * 3)
    z = (1e4 * base).to(dtype).requires_grad_(True)
    out = twd_loss(z, ids, 0.05)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(z.grad).all()
    if dtype == torch.float64:
        torch.testing.assert_close(out, torch.tensor(loop_twd(base, ids, 0.05), dtype=dtype), **TOL)


def test_twd_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 1, 0, 1, 2, 0])
    assert torch.autograd.gradcheck(lambda v: twd_loss(v, ids, 0.5), (z,))


@pytest.mark.parametrize(
    "z_shape,ids_shape",
    [((8,), (8,)), ((2, 4, 3), (2,)), ((4, 3), (5,)), ((4, 3), (4, 1)), ((4, 3), ())],
)
def test_twd_bad_shapes_raise(z_shape, ids_shape):
    z = torch.randn(z_shape)
    ids = torch.zeros(ids_shape, dtype=torch.long)
    with pytest.raises(ValueError, match="shape"):
        twd_loss(z, ids)


@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_twd_bad_tau_raises(tau):
    with pytest.raises(ValueError, match="tau"):
        twd_loss(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), tau)
