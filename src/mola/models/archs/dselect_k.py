"""DSelect-k (Hazimeh et al. 2021): MMoE whose per-task gates are k binary-encoded, smooth-step selectors.

Selector i holds m = ceil(log2 E) logits z_i; with the smooth step S (0 below -gamma/2, 1 above gamma/2,
cubic in between), r(z_i)_l = prod_j (S(z_ij) if bit j of l is 1 else 1 - S(z_ij)) is a distribution over
the 2^m binary codes l. The gate is q = sum_i softmax(w)_i r(z_i). When every S is 0 or 1 each r(z_i) is
one-hot, so at most k experts get weight. Codes l >= E (E not a power of two) alias expert l - E, so every
code selects a real expert and q always sums to 1. The entropy of the r(z_i), weighted, pushes S to 0/1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mola.models.archs.mmoe import ExpertBank, gate_input, gate_input_dim, mix
from mola.models.base import ARCHS, BackboneFactory, ModelConfig, MultiTaskModel, parse_options
from mola.tasks import Heterogeneity, TaskInfo


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """Hazimeh et al.'s cubic smooth step: 0 for t <= -gamma/2, 1 for t >= gamma/2, C^1 in between."""
    cubic = -2.0 / gamma**3 * t**3 + 3.0 / (2.0 * gamma) * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic))


class DSelectGate(nn.Module):
    """One task's DSelect-k gate: per-example (z, w linear in the gate input) or static (z, w parameters)."""

    def __init__(self, in_dim: int, num_experts: int, k: int, gamma: float, per_example: bool) -> None:
        super().__init__()
        self.k, self.gamma, self.per_example = k, gamma, per_example
        self.m = max(1, math.ceil(math.log2(num_experts)))
        codes = torch.arange(2**self.m)
        bits = ((codes[:, None] >> torch.arange(self.m)) & 1).float()  # (2^m, m)
        alias = torch.zeros(2**self.m, num_experts)
        alias[codes, codes % num_experts] = 1.0
        self.register_buffer("bits", bits, persistent=False)
        self.register_buffer("alias", alias, persistent=False)
        if per_example:
            self.z = nn.Linear(in_dim, k * self.m)
            self.w = nn.Linear(in_dim, k)
            bound = gamma / (2 * math.sqrt(in_dim))
            nn.init.uniform_(self.z.weight, -bound, bound)
            nn.init.uniform_(self.z.bias, -gamma / 4, gamma / 4)
        else:
            self.z_logits = nn.Parameter(torch.empty(k, self.m).uniform_(-gamma / 2, gamma / 2))
            self.w_logits = nn.Parameter(torch.zeros(k))

    def forward(self, inp: Tensor) -> tuple[Tensor, Tensor]:
        """Expert weights (B, E) and the mean selector entropy."""
        b = inp.shape[0]
        if self.per_example:
            z, w = self.z(inp).view(b, self.k, self.m), self.w(inp)
        else:
            z, w = self.z_logits.expand(b, -1, -1), self.w_logits.expand(b, -1)
        s = smooth_step(z, self.gamma)[:, :, None, :]  # (B, k, 1, m)
        r = (self.bits * s + (1 - self.bits) * (1 - s)).prod(dim=-1)  # (B, k, 2^m)
        q = torch.einsum("bk,bkl,le->be", torch.softmax(w, dim=1), r, self.alias)
        entropy = -(r * torch.log(r.clamp_min(1e-12))).sum(-1).mean()
        return q, entropy


@dataclass
class DSelectKOptions:
    """``num_experts`` experts, ``k`` selectors per task, smooth-step width ``gamma``, ``entropy_weight`` of
    the selector-entropy regulariser (``extra_loss``), ``per_example`` gates (else static per task);
    ``expert_from_stage`` and ``gate_pool`` as in MMoE."""

    num_experts: int = 4  # experts shared by the tasks
    k: int = 2  # selectors per task (at most k experts get weight)
    gamma: float = 1.0  # width of the smooth step
    entropy_weight: float = 1e-3  # weight of the selector-entropy regulariser
    per_example: bool = True  # gates depend on the input (else one static gate per task)
    expert_from_stage: int = 0  # backbone stages before this index form a shared bottom
    gate_pool: int = 4  # gates read the expert input pooled to gate_pool x gate_pool (0: global)


@ARCHS.register("dselect_k")
class DSelectK(MultiTaskModel):
    """MMoE with DSelect-k gates. Without autograd (inference) only experts some gate weights are run.

    ``self.features`` is the (B, E, ...) expert stack; ``self.gate_weights[t]`` task t's (rows, E) gate.
    """

    Options = DSelectKOptions
    task_specific_groups = ("heads", "gates")

    def __init__(self, backbone: BackboneFactory, tasks: list[TaskInfo], heterogeneity: Heterogeneity,
                 shared_head: bool, input_shape: tuple[int, ...], cfg: ModelConfig) -> None:
        super().__init__(tasks, heterogeneity, shared_head, input_shape)
        o = parse_options(DSelectKOptions, cfg.options, "dselect_k")
        if o.num_experts < 1 or not 1 <= o.k <= o.num_experts or o.gamma <= 0 or o.entropy_weight < 0:
            raise ValueError(f"arch 'dselect_k': need num_experts >= 1, 1 <= k <= num_experts, gamma > 0, "
                             f"entropy_weight >= 0, got {o}")
        self.options = o
        self.bank = ExpertBank(backbone, o.num_experts, o.expert_from_stage, self.input_shape, "dselect_k")
        dim = gate_input_dim(self.bank.expert_input_shape, o.gate_pool)
        self.gates = nn.ModuleList([DSelectGate(dim, o.num_experts, o.k, o.gamma, o.per_example) for _ in tasks])
        self.heads = self.make_heads(self.bank.out_dim, cfg.head_hidden)
        self.gate_weights: dict[int, Tensor] = {}
        self._entropy: Tensor | None = None

    def forward(self, x: Tensor, task_ids: Tensor) -> dict[int, Tensor]:
        size = self.out_size(x)
        h = self.bank.run_bottom(x)
        g_in = gate_input(h, self.options.gate_pool)
        rows = None if self.single_input else self.task_rows(task_ids)
        present = list(range(self.num_tasks)) if rows is None else list(rows)
        weights, entropies = {}, []
        for t in present:
            weights[t], ent = self.gates[t](g_in if rows is None else g_in[rows[t]])
            entropies.append(ent)
        self._entropy = torch.stack(entropies).mean()
        only = None
        if not torch.is_grad_enabled():
            used = torch.stack([w.gt(0).any(dim=0) for w in weights.values()]).any(dim=0)
            only = torch.nonzero(used).squeeze(1).tolist()
        experts = self.bank.run_experts(h, only)
        self.features = experts
        self.gate_weights = {t: w.detach() for t, w in weights.items()}
        return {t: self.head(t)(mix(weights[t], experts if rows is None else experts[rows[t]]), size)
                for t in present}

    def extra_loss(self, gather: Callable[[Tensor], Tensor] | None = None) -> Tensor | None:
        """``entropy_weight`` times the mean selector entropy of the last forward (None when the weight is 0);
        under DDP each process's own mean (``gather`` is not needed)."""
        if self.options.entropy_weight == 0 or self._entropy is None:
            return None
        return self.options.entropy_weight * self._entropy

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"bottom": list(self.bank.bottom.parameters()), "experts": list(self.bank.experts.parameters()),
                "gates": list(self.gates.parameters()), "heads": list(self.heads.parameters())}
