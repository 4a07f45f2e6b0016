"""GradientMethod: the shared machinery of every gradient-manipulation method (MGDA, PCGrad, CAGrad, ...).

One step: build G (T_present x D) of the present tasks' gradients w.r.t. the shared parameters (or, for the
"-UB" variants, w.r.t. the shared representation ``ctx.features``), turn it into one direction with
``aggregate``, write that direction into the shared parameters' ``.grad``, give every other trainable parameter
(heads, adapters, router, the method's own parameters) the ordinary gradient of the plain sum of the task
losses, and add the gradient of ``ctx.extra_loss`` on top. Cost: one backward pass per present task (with
``retain_graph=True``) plus one for the task-specific parameters (plus one for ``extra_loss``, one more for
"-UB" to carry the direction from the representation into the shared parameters).

Under DDP (``ctx.dist``, docs/distributed.md) the Trainer runs this without DDP's gradient hooks and averages
every gradient over the ranks afterwards. G is made global first: the shared parameters' per-task gradients
are summed over ranks (divided by the world size, as the losses carry a ``world_size`` factor); for "-UB" the
ranks' representation gradients are concatenated (rank order), the direction is computed on the whole batch
and each rank back-propagates its own rows (times the world size). The direction is then broadcast from rank
0, so random or iterative aggregators give one update on every rank.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mola.methods.base import Method, StepContext


def _dedupe(params: list[nn.Parameter], exclude: set[int]) -> list[nn.Parameter]:
    """Trainable parameters in order, each once, minus those whose id is in ``exclude``."""
    out, seen = [], set(exclude)
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _accumulate(p: Tensor, g: Tensor) -> None:
    """Add ``g`` into ``p.grad`` (creating it), like autograd's own accumulation."""
    g = g.to(dtype=p.dtype)
    if p.grad is None:
        p.grad = g.detach().clone()
    else:
        p.grad.add_(g.detach())


def loss_sum(parts: list[Tensor]) -> Tensor | None:
    """Plain sum of scalar losses (None for none); ``+`` so mixed dtypes under autocast still add."""
    total = None
    for part in parts:
        total = part if total is None else total + part
    return total


def flat_grads(loss: Tensor, wrt: list[Tensor]) -> Tensor:
    """Gradient of ``loss`` w.r.t. ``wrt`` flattened into one vector (unused inputs count as zeros)."""
    grads = torch.autograd.grad(loss, wrt, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(w) if g is None else g).reshape(-1) for g, w in zip(grads, wrt, strict=True)])


def _direction_logs(G: Tensor, d: Tensor, tasks: list[int]) -> dict[str, Tensor | float]:
    """What a gradient step did, as device tensors (no host sync): ``conflicts``, the number of task pairs whose
    gradients point against each other (negative inner product), and ``cos<t>``, the cosine between task t's
    gradient and the applied direction."""
    gram = G.detach() @ G.detach().T
    cos = (G.detach() @ d.detach()) / (G.detach().norm(dim=1) * d.detach().norm()).clamp_min(1e-12)
    out: dict[str, Tensor | float] = {"conflicts": (torch.triu(gram, 1) < 0).sum().float()}
    out.update({f"cos{t}": cos[i] for i, t in enumerate(tasks)})
    return out


class GradientMethod(Method):
    """Base of gradient methods: subclasses implement ``direction(G, tasks, losses)`` (usually a call to the
    module-level ``aggregate``) and may override ``task_losses`` to transform the losses first (IMTL-L)."""

    needs = "grads"

    def task_losses(self, losses: dict[int, Tensor], ctx: StepContext) -> dict[int, Tensor]:
        """The per-task losses the gradients are taken of; identity by default."""
        return losses

    def direction(self, G: Tensor, tasks: list[int], losses: list[Tensor]) -> Tensor:
        """Aggregate the (T_present x D) matrix ``G`` of the present ``tasks`` into one D-vector."""
        raise NotImplementedError

    def backward(self, losses: dict[int, Tensor], ctx: StepContext) -> dict[str, Tensor | float]:
        """Fill ``.grad``: aggregated direction on the shared parameters, plain gradients elsewhere."""
        losses = self.task_losses(losses, ctx)
        extra = ctx.extra_loss
        shared = _dedupe(list(ctx.shared_params), set())
        others = _dedupe(list(ctx.task_params) + list(self.parameters()), {id(p) for p in shared})
        tasks = sorted(losses)
        if len(tasks) <= 1 or not shared:  # nothing to aggregate: one task's gradient is the direction
            total = loss_sum([losses[t] for t in tasks] + ([extra] if extra is not None else []))
            if total is not None and total.requires_grad and shared + others:
                torch.autograd.backward(total, inputs=shared + others)
            return {}
        G, rows = self._gradient_matrix(losses, tasks, shared, ctx)
        d = self.direction(G, tasks, [losses[t] for t in tasks]).to(G.dtype)
        logs = _direction_logs(G, d, tasks)
        if ctx.dist is not None:
            d = ctx.dist.broadcast_(d.contiguous())
            if rows is not None:
                d = d[rows[0]:rows[0] + rows[1]] * ctx.dist.world_size
        self._apply_direction(d, shared, others, ctx)
        total = loss_sum([losses[t] for t in tasks])
        if others and total is not None and total.requires_grad:
            torch.autograd.backward(total, inputs=others, retain_graph=extra is not None)
        if extra is not None and extra.requires_grad:
            torch.autograd.backward(extra, inputs=shared + others)
        return logs

    def _gradient_matrix(self, losses: dict[int, Tensor], tasks: list[int], shared: list[nn.Parameter],
                         ctx: StepContext) -> tuple[Tensor, tuple[int, int] | None]:
        """(G, rows): the (T x D) task gradients w.r.t. the shared parameters (or, for ``rep_grads``, the shared
        representation), averaged over DDP ranks; ``rows``: this rank's slice of a gathered representation."""
        rep = self.needs == "rep_grads"
        if rep and (ctx.features is None or not ctx.features.requires_grad):
            raise ValueError(f"{type(self).__name__} needs ctx.features (the shared representation in the graph)")
        wrt: list[Tensor] = [ctx.features] if rep and ctx.features is not None else list(shared)
        G = torch.stack([flat_grads(losses[t], wrt) for t in tasks])
        dist = ctx.dist
        if dist is not None and rep:
            counts = dist.row_counts(G.shape[1])
            rows = (sum(counts[:dist.rank]), counts[dist.rank])
            return dist.gather_rows(G.T.contiguous()).T / dist.world_size, rows
        if dist is not None:
            G = dist.all_reduce_sum(G) / dist.world_size
        return G, None

    def _apply_direction(self, d: Tensor, shared: list[nn.Parameter], others: list[nn.Parameter],
                         ctx: StepContext) -> None:
        """Accumulate direction ``d`` into the shared parameters' ``.grad`` (through the representation for
        ``rep_grads``; a shared parameter downstream of it joins ``others``, which get plain gradients)."""
        if self.needs == "rep_grads":
            feats = ctx.features
            assert feats is not None
            grads = torch.autograd.grad(feats, shared, grad_outputs=d.view_as(feats).to(feats.dtype),
                                        retain_graph=True, allow_unused=True)
            for p, g in zip(shared, grads, strict=True):
                if g is None:
                    others.append(p)
                else:
                    _accumulate(p, g)
            return
        offset = 0
        for p in shared:
            n = p.numel()
            _accumulate(p, d[offset:offset + n].view_as(p))
            offset += n

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, needs={self.needs!r}"


def check_options(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """ValueError naming the option and its accepted values."""
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(repr(a) for a in allowed)}")
