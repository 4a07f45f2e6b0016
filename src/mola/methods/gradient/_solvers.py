"""Small dense solvers on T x T Gram matrices shared by the gradient methods (float64 NumPy, T is tiny).

Everything here works on the Gram matrix K = G G^T of the task gradients, never on the D-dimensional rows, so
the cost is independent of the model size once K is formed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor


def gram(G: Tensor) -> np.ndarray:
    """K = G G^T as a float64 NumPy array (the one host transfer of a gradient method's solve)."""
    K = G.detach().to(torch.float64) @ G.detach().to(torch.float64).T
    return K.cpu().numpy()


def host_orders(num_tasks: int, generator: torch.Generator | None = None) -> list[list[int]]:
    """One random task order per task (``num_tasks`` draws of ``torch.randperm`` on the host, CPU generator), read
    together: the projection orders of PCGrad and GradVac, with no device read."""
    return torch.stack([torch.randperm(num_tasks, generator=generator) for _ in range(num_tasks)]).tolist()


def combine(weights: np.ndarray | Tensor, G: Tensor) -> Tensor:
    """The direction sum_t weights_t * G_t in G's dtype and device."""
    w = torch.as_tensor(weights, dtype=torch.float64).to(device=G.device, dtype=G.dtype)
    return w @ G


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of v onto the probability simplex (sort-based, O(T log T))."""
    n = v.shape[0]
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    idx = np.arange(1, n + 1)
    cond = u - css / idx > 0
    rho = int(idx[cond][-1])
    theta = css[rho - 1] / rho
    return np.maximum(v - theta, 0.0)


def _affine_min_norm(Ks: np.ndarray) -> np.ndarray:
    """Weights (summing to 1) of the min-norm point of the affine hull of the points with Gram ``Ks``."""
    m = Ks.shape[0]
    if m == 1:
        return np.ones(1)
    A = np.zeros((m + 1, m + 1))
    A[:m, :m] = Ks
    A[:m, m] = 1.0
    A[m, :m] = 1.0
    rhs = np.zeros(m + 1)
    rhs[m] = 1.0
    sol = np.linalg.lstsq(A, rhs, rcond=None)[0]
    return sol[:m]


def min_norm_weights(K: np.ndarray, tol: float = 1e-12, max_iter: int | None = None) -> np.ndarray:
    """Simplex weights of the min-norm point of the convex hull of the rows with Gram ``K``.

    Wolfe's (1976) minimum-norm-point algorithm: exact up to ``tol`` (relative to max_t ||g_t||^2) in a finite
    number of corral changes, unlike Frank-Wolfe which only converges sublinearly.
    """
    T = K.shape[0]
    scale = float(np.max(np.diag(K)))
    if T == 1 or not np.isfinite(scale) or scale <= 0.0:
        w = np.zeros(T)
        w[int(np.argmin(np.diag(K))) if T else 0] = 1.0
        return w
    Kn = K / scale
    corral = [int(np.argmin(np.diag(Kn)))]
    lam = np.ones(1)
    max_iter = max_iter or 50 * T + 50
    for _ in range(max_iter):
        kx = Kn[:, corral] @ lam  # <g_i, x> for every i
        xx = float(lam @ kx[corral])
        j = int(np.argmin(kx))
        if xx - kx[j] <= tol or j in corral:
            break
        corral.append(j)
        lam = np.append(lam, 0.0)
        for _minor in range(T + 1):
            alpha = _affine_min_norm(Kn[np.ix_(corral, corral)])
            if np.all(alpha > 1e-15):
                lam = alpha
                break
            neg = alpha <= 1e-15
            denom = lam[neg] - alpha[neg]
            ratios = np.where(denom > 0, lam[neg] / np.where(denom > 0, denom, 1.0), np.inf)
            theta = float(min(np.min(ratios), 1.0))
            lam = (1.0 - theta) * lam + theta * alpha
            keep = lam > 1e-15
            if keep.all():  # numerically stuck: drop the smallest weight
                keep[int(np.argmin(lam))] = False
            corral = [c for c, k in zip(corral, keep, strict=True) if k]
            lam = lam[keep] / lam[keep].sum()
    w = np.zeros(T)
    w[corral] = lam
    return w


def minimize_on_simplex(fun_grad: Callable[[np.ndarray], tuple[float, np.ndarray]], x0: np.ndarray,
                        max_iter: int = 5000, tol: float = 1e-13) -> np.ndarray:
    """Accelerated projected gradient (FISTA with backtracking and adaptive restart) for a convex function.

    ``fun_grad(x) -> (f, grad)``; stops when the projected-gradient step from an iterate is below ``tol``
    (max norm) or after ``max_iter`` iterations.
    """
    x = project_simplex(x0)
    y = x.copy()
    t = 1.0
    step = 1.0
    fx, _ = fun_grad(x)
    for _ in range(max_iter):
        fy, gy = fun_grad(y)
        while True:
            x_new = project_simplex(y - step * gy)
            diff = x_new - y
            f_new, _ = fun_grad(x_new)
            if f_new <= fy + gy @ diff + (diff @ diff) / (2.0 * step) + 1e-15 or step < 1e-20:
                break
            step *= 0.5
        if f_new > fx:  # adaptive restart keeps the momentum from overshooting
            t = 1.0
            y = x.copy()
            step *= 2.0
            continue
        t_new = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        y = x_new + ((t - 1.0) / t_new) * (x_new - x)
        x, fx, t = x_new, f_new, t_new
        step *= 1.5
        _, gx = fun_grad(x)
        if float(np.max(np.abs(project_simplex(x - gx) - x))) < tol:
            break
    return x
