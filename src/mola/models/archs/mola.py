"""MoLA as an architecture: a backbone with MoLA layers injected (Grad or Router mode) plus task heads."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mola.inject import inject
from mola.models.base import ARCHS, BackboneFactory, ModelConfig, MultiTaskModel, parse_options
from mola.tasks import Heterogeneity, TaskInfo


@dataclass
class MoLAOptions:
    """MoLA has no arch options beyond ``model.mola`` (MoLAConfig)."""


@ARCHS.register("mola")
class MoLANet(MultiTaskModel):
    """MoLA-Grad / MoLA-Router (docs/concepts.md). E defaults to the number of tasks (with ``task_to_expert``:
    the number of adapters it names). Router mode takes any E; grad mode needs E = T or ``task_to_expert``.

    Single-input tasks in grad mode run the encoder once per task (the batch repeated T times with ids
    0..T-1), so every task's adapter is trained on its own head's loss (docs/concepts.md).
    """

    Options = MoLAOptions

    def __init__(self, backbone: BackboneFactory, tasks: list[TaskInfo], heterogeneity: Heterogeneity,
                 shared_head: bool, input_shape: tuple[int, ...], cfg: ModelConfig) -> None:
        super().__init__(tasks, heterogeneity, shared_head, input_shape)
        parse_options(MoLAOptions, cfg.options, "mola")
        mcfg = cfg.mola
        t2e = mcfg.task_to_expert
        if t2e is not None and len(t2e) != len(tasks):
            raise ValueError(f"model.mola.task_to_expert={list(t2e)} has {len(t2e)} entries for {len(tasks)} tasks "
                             f"({', '.join(t.name for t in tasks)}): give one adapter index per task")
        if mcfg.num_experts == 0:
            mcfg = dataclasses.replace(mcfg, num_experts=max(t2e) + 1 if t2e is not None else len(tasks))
        if mcfg.mode == "grad" and mcfg.num_experts != len(tasks) and t2e is None:
            raise ValueError(f"MoLA-Grad needs num_experts = number of tasks ({len(tasks)}), got {mcfg.num_experts}: "
                             "a task id picks its adapter; set model.mola.task_to_expert (one adapter index per "
                             "task, e.g. [0, 0, 1]) to share adapters between tasks, or use mode router")
        self.mola_config = mcfg
        # grad mode: adapter t sees task t only (task-specific); router mode: every sample mixes every adapter,
        # so the adapters are shared and gradient methods combine their per-task gradients
        self.task_specific_groups = ("heads", "adapters") if mcfg.mode == "grad" else ("heads",)
        net = backbone()
        self.encoder = inject(net, mcfg)
        self.heads = self.make_heads(net.out_dim, cfg.head_hidden)

    @property
    def mode(self) -> str:
        return self.mola_config.mode

    def forward(self, x: Tensor, task_ids: Tensor) -> dict[int, Tensor]:
        size = self.out_size(x)
        if self.single_input and self.mode == "grad":
            b, t = x.shape[0], self.num_tasks
            ids = torch.arange(t, device=x.device).repeat_interleave(b)
            feats = self.encoder(x.repeat(t, *([1] * (x.dim() - 1))), task_ids=ids)
            self.features = feats
            return {i: self.head(i)(feats[i * b:(i + 1) * b], size) for i in range(t)}
        if self.single_input:
            feats = self.encoder(x)
        elif self.mode == "grad":  # ids checked by this model's pre-hook; one grouping per batch for all layers
            feats = self.encoder(x, task_ids=task_ids.long(), groups=self.task_groups(task_ids), checked=True)
        else:
            feats = self.encoder(x, task_ids=task_ids.long(), checked=True)
        self.features = feats
        return self.apply_heads(feats, task_ids, size)

    def extra_loss(self, gather: Callable[[Tensor], Tensor] | None = None) -> Tensor | None:
        """lambda * TwD in router mode for multi-input/domain data (single-input samples share all tasks);
        with ``gather`` (DDP) over the codes of the whole global batch."""
        if self.mode != "router" or self.single_input or self.mola_config.twd_weight == 0:
            return None
        return self.mola_config.twd_weight * self.encoder.twd_loss(gather)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        adapters = list(self.encoder.adapter_parameters().values())
        ids = {id(p) for p in adapters}
        groups = {
            "backbone": [p for p in self.encoder.model.parameters() if id(p) not in ids],
            "adapters": adapters,
            "router": list(self.encoder.router.parameters()) if self.encoder.router is not None else [],
            "lift": list(self.encoder.lift.parameters()) if self.encoder.lift is not None else [],
            "heads": list(self.heads.parameters()),
        }
        return groups
