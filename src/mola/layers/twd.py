"""Task-wise Decorrelation loss (docs/concepts.md): supervised-contrastive loss on router codes, tasks as labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def twd_loss(z: Tensor, task_ids: Tensor, tau: float = 1.0) -> Tensor:
    """Mean over same-task pairs (i != j) of -log(exp(u_i.u_j/tau) / sum_{k != i} exp(u_i.u_k/tau)).

    u = z / ||z||, so the loss ignores the scale of z. With no same-task pair it returns a zero that is still
    connected to ``z`` (backward gives zero gradients, never NaN).
    """
    if z.dim() != 2:
        raise ValueError(f"twd_loss expects codes z of shape (B, d), got {tuple(z.shape)}")
    if task_ids.shape != (z.shape[0],):
        raise ValueError(f"twd_loss: task_ids must have shape ({z.shape[0]},), got {tuple(task_ids.shape)}")
    if tau <= 0:
        raise ValueError(f"twd_loss: tau must be > 0, got {tau}")
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    pos = (task_ids[:, None] == task_ids[None, :]) & ~eye
    if n < 2:
        return z.sum() * 0.0
    npos = pos.sum()  # stays a tensor: no host sync, so torch.compile traces the loss without a graph break
    u = F.normalize(z.float() if z.dtype in (torch.float16, torch.bfloat16) else z, dim=1)
    sim = (u @ u.T) / tau
    log_prob = sim - torch.logsumexp(sim.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    # with no same-task pair the sum is 0 (log_prob is finite) and clamp avoids 0/0: a zero with zero grads
    return -(log_prob * pos).sum() / npos.clamp(min=1)
