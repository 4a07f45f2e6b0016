"""Spectra of MoLA layer weights (docs/results.md): singular values, numerical rank, principal-component proportion.

Every weight is flattened to Co x (Ci/g * kh * kw) before its singular values are taken. Singular values are
computed in float64; the numerical-rank tolerance follows ``numpy.linalg.matrix_rank``
(sigma_max * max(M, N) * eps) with the machine epsilon of the weight's own dtype, so float32 round-off in a
trained weight is not counted as rank.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mola.inject import find_mola_model
from mola.layers import MoLAConv2d, MoLALayer


def flatten_weight(w: Tensor) -> Tensor:
    """A weight as a float64 matrix Co x rest (conv kernels Co x Ci/g x kh x kw -> Co x Ci/g*kh*kw)."""
    w = w.detach()
    if w.dim() < 2:
        raise ValueError(f"expected a weight with at least 2 dims (Co x ...), got shape {tuple(w.shape)}")
    return w.reshape(w.shape[0], -1).to(torch.float64)


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps


GRAM_MIN = 64
"""Weights of at most float32 precision whose flattened matrix is at least this size in both dims take their
singular values from the float64 Gram matrix (about 10x faster than an SVD for 512 x 4608; absolute error
~1e-8 * sigma_max, far below the float32 rank tolerance of >= 7e-6 * sigma_max)."""


def singular_values(w: Tensor) -> Tensor:
    """All singular values of the flattened weight, descending (float64, length min(Co, rest))."""
    # numpy's LAPACK, not torch's: torch's threaded svdvals is up to ~1000x slower on small matrices on a busy CPU
    m = flatten_weight(w).cpu().numpy()
    if min(m.shape) >= GRAM_MIN and torch.finfo(w.dtype).bits <= 32:
        gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
        s = np.sqrt(np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None))
    else:
        s = np.linalg.svd(m, compute_uv=False)
    return torch.from_numpy(np.ascontiguousarray(s))


def _rank(s: Tensor, w: Tensor, tol: float | None = None) -> int:
    """Numerical rank from the singular values ``s`` of weight ``w``."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    if tol is None:
        tol = float(s[0]) * max(w.shape[0], w[0].numel()) * _eps(w.dtype)
    return int((s > tol).sum())


def numerical_rank(w: Tensor, tol: float | None = None) -> int:
    """Number of singular values above ``tol`` (default: numpy's matrix_rank tolerance for w's dtype)."""
    return _rank(singular_values(w), w, tol)


def _pc_from(s: Tensor, n: int, eps: float) -> dict[str, Any]:
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"eps must lie in (0, 1], got {eps}")
    if n == 0:
        return {"kstar": 0, "rank": 0, "proportion": math.nan}
    cum = torch.cumsum(s[:n], 0)
    # relative slack of a few ulps so that eps = 1 is reached by the full sum despite round-off
    reached = cum >= eps * float(cum[-1]) * (1.0 - 1e-12)
    kstar = int(torch.nonzero(reached)[0, 0]) + 1
    return {"kstar": kstar, "rank": n, "proportion": kstar / n}


def pc_stats(w: Tensor, eps: float = 0.99) -> dict[str, Any]:
    """k* (smallest k with sum_{i<=k} sigma_i / sum_{i<=n} sigma_i >= eps), n (numerical rank), k*/n."""
    s = singular_values(w)
    return _pc_from(s, _rank(s, w), eps)


def pc_proportion(w: Tensor, eps: float = 0.99) -> float:
    """Principal-component proportion k*/n of a weight (paper Fig. 3); nan for an all-zero weight."""
    return float(pc_stats(w, eps)["proportion"])


def delta_rank_bound(layer: MoLALayer) -> int:
    """Largest possible rank of a reshaped update dW_e: r*kh^2 in the kernel layout of a kxk conv, else r."""
    co = layer.weight.shape[0]
    cols = layer.weight[0].numel()
    r = layer.rank
    if isinstance(layer, MoLAConv2d) and layer.layout == "kernel":
        r = r * layer.weight.shape[2] ** 2
    return min(r, co, cols)


def _note(layer: MoLALayer) -> str:
    if isinstance(layer, MoLAConv2d) and layer.layout == "kernel" and layer.weight.shape[2] > 1:
        k = layer.weight.shape[2]
        return (f"kernel layout: dW_e = reshape(B_e A_e) as a Co x Ci*k^2 matrix can have rank up to "
                f"r*k^2 = {layer.rank * k * k} (k={k}), not r={layer.rank}")
    return f"rank(dW_e) <= r = {layer.rank}"


@torch.no_grad()
def adapter_weights(layer: MoLALayer) -> list[tuple[Tensor, Tensor]]:
    """Per adapter e: (s * dW_e, W0 + s * dW_e), both shaped like W0."""
    deltas = layer.scaling * layer.delta_weights()
    w0 = layer.weight.detach()
    return [(d, w0 + d) for d in deltas]


@torch.no_grad()
def layer_spectra(mola_model: nn.Module, eps: float = 0.99) -> list[dict[str, Any]]:
    """One row per MoLA layer: rank/k*/pc proportion of W0 and of W0 + s*dW_e per adapter, rank of s*dW_e."""
    enc = find_mola_model(mola_model)
    if enc is None:
        raise ValueError(f"{type(mola_model).__name__} has no MoLA layers; layer_spectra needs a MoLA model")
    rows = []
    for name, layer in enc.mola_layers().items():
        w0 = layer.weight.detach()
        st = pc_stats(w0, eps)
        row: dict[str, Any] = {
            "layer": name, "type": "conv" if isinstance(layer, MoLAConv2d) else "linear",
            "shape": "x".join(str(d) for d in w0.shape), "layout": layer.layout, "r": layer.rank,
            "scaling": layer.scaling, "eps": eps,
            "w0_rank": st["rank"], "w0_kstar": st["kstar"], "w0_pc": st["proportion"],
        }
        for e, (delta, merged) in enumerate(adapter_weights(layer)):
            sm = pc_stats(merged, eps)
            row[f"e{e}_rank"] = sm["rank"]
            row[f"e{e}_kstar"] = sm["kstar"]
            row[f"e{e}_pc"] = sm["proportion"]
            row[f"e{e}_delta_rank"] = numerical_rank(delta)
        row["delta_rank_bound"] = delta_rank_bound(layer)
        row["note"] = _note(layer)
        rows.append(row)
    return rows


@torch.no_grad()
def layer_singular_values(mola_model: nn.Module, experts: tuple[int, ...] = (0, 1)) -> dict[str, dict[str, Tensor]]:
    """Per MoLA layer, the nonzero singular values of W0 and of W0 + s*dW_e for the given adapters."""
    enc = find_mola_model(mola_model)
    if enc is None:
        raise ValueError(f"{type(mola_model).__name__} has no MoLA layers")
    out: dict[str, dict[str, Tensor]] = {}
    for name, layer in enc.mola_layers().items():
        mats = {"W0": layer.weight.detach()}
        pairs = adapter_weights(layer)
        for e in experts:
            if e < len(pairs):
                mats[f"W0+s*dW{e}"] = pairs[e][1]
        out[name] = {}
        for k, m in mats.items():
            s = singular_values(m)
            out[name][k] = s[: max(1, _rank(s, m))]
    return out


__all__ = ["adapter_weights", "delta_rank_bound", "flatten_weight", "layer_singular_values",
           "layer_spectra", "numerical_rank", "pc_proportion", "pc_stats", "singular_values"]
