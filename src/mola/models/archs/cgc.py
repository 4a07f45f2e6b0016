"""Customized Gate Control (Tang et al. 2020, the single-level PLE): shared experts plus task-specific experts;
task t's gate mixes the shared experts and its own experts only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mola.models.archs.mmoe import ExpertBank, gate_input, gate_input_dim, mix
from mola.models.base import ARCHS, BackboneFactory, ModelConfig, MultiTaskModel, parse_options
from mola.tasks import Heterogeneity, TaskInfo


@dataclass
class CGCOptions:
    """``num_shared`` shared experts, ``num_specific`` experts per task; ``expert_from_stage`` and
    ``gate_pool`` as in MMoE (a shared bottom of the first stages; the gates' pooled input)."""

    num_shared: int = 2  # shared experts (run on every sample)
    num_specific: int = 1  # experts per task (run on that task's samples)
    expert_from_stage: int = 0  # backbone stages before this index form a shared bottom
    gate_pool: int = 4  # gates read the expert input pooled to gate_pool x gate_pool (0: global)


@ARCHS.register("cgc")
class CGC(MultiTaskModel):
    """Shared experts run on every sample, task t's experts only on task t's rows (all rows for single-input,
    and in training when the task has a single row, as BatchNorm needs two);
    task t's softmax gate has num_shared + num_specific outputs, ordered shared experts first.

    ``self.features`` is the (B, num_shared, ...) stack of shared-expert outputs. ``self.gate_weights[t]``
    holds task t's (rows, num_shared + num_specific) gate of the last forward.
    """

    Options = CGCOptions
    task_specific_groups = ("heads", "gates", "task_experts")

    def __init__(self, backbone: BackboneFactory, tasks: list[TaskInfo], heterogeneity: Heterogeneity,
                 shared_head: bool, input_shape: tuple[int, ...], cfg: ModelConfig) -> None:
        super().__init__(tasks, heterogeneity, shared_head, input_shape)
        o = parse_options(CGCOptions, cfg.options, "cgc")
        if o.num_shared < 1 or o.num_specific < 0 or o.gate_pool < 0:
            raise ValueError(f"arch 'cgc': need num_shared >= 1, num_specific >= 0, gate_pool >= 0, got {o}")
        self.options = o
        self.shared = ExpertBank(backbone, o.num_shared, o.expert_from_stage, self.input_shape, "cgc")
        self.specific = nn.ModuleList([
            ExpertBank(backbone, o.num_specific, o.expert_from_stage, self.input_shape, "cgc", build_bottom=False)
            for _ in tasks
        ]) if o.num_specific > 0 else nn.ModuleList()
        dim = gate_input_dim(self.shared.expert_input_shape, o.gate_pool)
        self.gates = nn.ModuleList([nn.Linear(dim, o.num_shared + o.num_specific) for _ in tasks])
        self.heads = self.make_heads(self.shared.out_dim, cfg.head_hidden)
        self.gate_weights: dict[int, Tensor] = {}

    def forward(self, x: Tensor, task_ids: Tensor) -> dict[int, Tensor]:
        size = self.out_size(x)
        h = self.shared.run_bottom(x)
        g_in = gate_input(h, self.options.gate_pool)
        shared = self.shared.run_experts(h)
        self.features = shared
        rows = None if self.single_input else self.task_rows(task_ids)
        out, self.gate_weights = {}, {}
        for t in range(self.num_tasks) if rows is None else rows:
            ht, gi, ex = (h, g_in, shared) if rows is None else (h[rows[t]], g_in[rows[t]], shared[rows[t]])
            if self.options.num_specific > 0:
                if rows is not None and self.training and len(rows[t]) == 1:  # BatchNorm needs 2+ samples
                    spec = self.specific[t].run_experts(h)[rows[t]]
                else:
                    spec = self.specific[t].run_experts(ht)
                ex = torch.cat([ex, spec], dim=1)
            w = torch.softmax(self.gates[t](gi), dim=1)
            self.gate_weights[t] = w.detach()
            out[t] = self.head(t)(mix(w, ex), size)
        return out

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"bottom": list(self.shared.bottom.parameters()), "experts": list(self.shared.experts.parameters()),
                "task_experts": list(self.specific.parameters()), "gates": list(self.gates.parameters()),
                "heads": list(self.heads.parameters())}
