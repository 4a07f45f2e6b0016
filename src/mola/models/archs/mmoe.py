"""Multi-gate Mixture-of-Experts (Ma et al. 2018): shared experts, one softmax gate per task, heads as towers.

Also home of the expert/gate helpers shared by ``cgc`` and ``dselect_k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mola.models.archs.cross_stitch import backbone_stages, run_stages, stage_shapes, stage_slice
from mola.models.base import ARCHS, BackboneFactory, ModelConfig, MultiTaskModel, parse_options
from mola.tasks import Heterogeneity, TaskInfo


def gate_input(h: Tensor, pool: int) -> Tensor:
    """What a gate reads: maps average-pooled to pool x pool (global average for pool 0), then flattened."""
    if h.dim() == 4:
        h = F.adaptive_avg_pool2d(h, pool) if pool > 0 else h.mean(dim=(2, 3))
    return h.flatten(1)


def gate_input_dim(shape: tuple[int, ...], pool: int) -> int:
    return gate_input(torch.zeros(1, *shape), pool).shape[1]


class ExpertBank(nn.Module):
    """Optional shared bottom (backbone stages ``:from_stage``) and ``n`` experts (copies of the remaining
    stages; full backbones when ``from_stage`` is 0)."""

    def __init__(self, backbone: BackboneFactory, n: int, from_stage: int, input_shape: tuple[int, ...],
                 arch: str, build_bottom: bool = True) -> None:
        super().__init__()
        nets = [backbone() for _ in range(max(n, 1))]
        self.out_dim: int = nets[0].out_dim
        stages = [backbone_stages(net) for net in nets]
        num = len(stages[0])
        if not 0 <= from_stage < num:
            raise ValueError(f"arch {arch!r}: expert_from_stage must be in [0, {num - 1}] for this backbone "
                             f"(stages {list(stages[0].keys())}), got {from_stage}")
        self.bottom = stage_slice(stages[0], 0, from_stage) if build_bottom else nn.ModuleDict()
        self.experts = nn.ModuleList([stage_slice(s, from_stage) for s in stages[:n]])
        shapes = stage_shapes(stages[0], input_shape)
        self.expert_input_shape = tuple(input_shape) if from_stage == 0 else shapes[from_stage - 1]

    def run_bottom(self, x: Tensor) -> Tensor:
        return run_stages(self.bottom, x)

    def run_experts(self, h: Tensor, only: list[int] | None = None) -> Tensor:
        """Stacked expert outputs (B, E, ...); experts not in ``only`` are zeros (not computed)."""
        if only is None:
            return torch.stack([run_stages(e, h) for e in self.experts], dim=1)
        done = {i: run_stages(self.experts[i], h) for i in only}
        zero = torch.zeros_like(next(iter(done.values())))
        return torch.stack([done.get(i, zero) for i in range(len(self.experts))], dim=1)


def mix(weights: Tensor, experts: Tensor) -> Tensor:
    """Per-sample convex combination: weights (B, E), experts (B, E, ...) -> (B, ...)."""
    return torch.einsum("be,be...->b...", weights, experts)


@dataclass
class MMoEOptions:
    """``num_experts`` experts; ``expert_from_stage`` > 0 shares backbone stages before that index (0 = stem
    for conv nets) and makes experts copies of the rest (0: experts are full encoders, as in the paper);
    ``gate_pool``: gates read the experts' input average-pooled to gate_pool x gate_pool (0: global pool)."""

    num_experts: int = 4  # experts shared by the tasks
    expert_from_stage: int = 0  # backbone stages before this index form a shared bottom (0: none)
    gate_pool: int = 4  # gates read the expert input pooled to gate_pool x gate_pool (0: global)


@ARCHS.register("mmoe")
class MMoE(MultiTaskModel):
    """E experts on every sample; task t mixes them with softmax(W_t g(x)), g(x) the pooled, flattened expert
    input, and its head (the paper's tower) reads the mixture.

    ``self.features`` is the (B, E, ...) stack of expert outputs (the shared representation: experts below,
    gates and heads above; with a shared bottom, the gates' path into the bottom bypasses it).
    ``self.gate_weights[t]`` holds task t's (rows, E) gate of the last forward.
    """

    Options = MMoEOptions
    task_specific_groups = ("heads", "gates")

    def __init__(self, backbone: BackboneFactory, tasks: list[TaskInfo], heterogeneity: Heterogeneity,
                 shared_head: bool, input_shape: tuple[int, ...], cfg: ModelConfig) -> None:
        super().__init__(tasks, heterogeneity, shared_head, input_shape)
        o = parse_options(MMoEOptions, cfg.options, "mmoe")
        if o.num_experts < 1 or o.gate_pool < 0:
            raise ValueError(f"arch 'mmoe': need num_experts >= 1 and gate_pool >= 0, got {o}")
        self.options = o
        self.bank = ExpertBank(backbone, o.num_experts, o.expert_from_stage, self.input_shape, "mmoe")
        dim = gate_input_dim(self.bank.expert_input_shape, o.gate_pool)
        self.gates = nn.ModuleList([nn.Linear(dim, o.num_experts) for _ in tasks])
        self.heads = self.make_heads(self.bank.out_dim, cfg.head_hidden)
        self.gate_weights: dict[int, Tensor] = {}

    def forward(self, x: Tensor, task_ids: Tensor) -> dict[int, Tensor]:
        size = self.out_size(x)
        h = self.bank.run_bottom(x)
        g_in = gate_input(h, self.options.gate_pool)
        experts = self.bank.run_experts(h)
        self.features = experts
        rows = None if self.single_input else self.task_rows(task_ids)
        out, self.gate_weights = {}, {}
        for t in range(self.num_tasks) if rows is None else rows:
            gi, ex = (g_in, experts) if rows is None else (g_in[rows[t]], experts[rows[t]])
            w = torch.softmax(self.gates[t](gi), dim=1)
            self.gate_weights[t] = w.detach()
            out[t] = self.head(t)(mix(w, ex), size)
        return out

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"bottom": list(self.bank.bottom.parameters()), "experts": list(self.bank.experts.parameters()),
                "gates": list(self.gates.parameters()), "heads": list(self.heads.parameters())}
