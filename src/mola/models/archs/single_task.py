"""Single-task networks: one independent encoder + head per task.

As ``single_task_joint`` the T networks are trained together in one run (each on its task's rows of one mixed
batch, one optimizer, one model selection). ``single_task`` names the same networks trained as the paper does,
one separate run per task (``mola.engine.single_task``); the engine builds this class per task for it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from mola.data.base import Heterogeneity, TaskInfo
from mola.models.base import ARCHS, BackboneFactory, ModelConfig, MultiTaskModel, parse_options
from mola.models.heads import make_head


@dataclass
class SingleTaskOptions:
    """Single-task has no options."""


@ARCHS.register("single_task")
@ARCHS.register("single_task_joint")
class SingleTask(MultiTaskModel):
    """T encoders and T heads; sample rows go only to their task's network, so nothing is shared. Under
    ``single_task`` the engine trains each task's network in its own run; ``single_task_joint`` trains them
    together on one mixed batch."""

    Options = SingleTaskOptions
    task_specific_groups = ("heads", "towers")

    def __init__(self, backbone: BackboneFactory, tasks: list[TaskInfo], heterogeneity: Heterogeneity,
                 shared_head: bool, input_shape: tuple[int, ...], cfg: ModelConfig) -> None:
        super().__init__(tasks, heterogeneity, False, input_shape)
        parse_options(SingleTaskOptions, cfg.options, "single_task")
        self.towers = nn.ModuleList([backbone() for _ in tasks])
        dim = self.towers[0].out_dim
        self.heads = nn.ModuleList([make_head(t, dim, cfg.head_hidden) for t in tasks])

    def forward(self, x: Tensor, task_ids: Tensor) -> dict[int, Tensor]:
        size = self.out_size(x)
        if self.single_input:
            return {t: self.heads[t](self.towers[t](x), size) for t in range(self.num_tasks)}
        return {t: self.heads[t](self._tower(t, x.index_select(0, rows)), size)
                for t, rows in self.task_rows(task_ids).items()}

    def _tower(self, t: int, x: Tensor) -> Tensor:
        """Task t's encoder; a lone row in training uses BatchNorm's running statistics (a batch of one has no
        batch variance), where BatchNorm would otherwise raise for vector inputs."""
        tower = self.towers[t]
        norms = [m for m in tower.modules() if isinstance(m, _BatchNorm) and m.training]
        if x.shape[0] != 1 or not norms:
            return tower(x)
        for m in norms:
            m.eval()
        try:
            return tower(x)
        finally:
            for m in norms:
                m.train()

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"towers": list(self.towers.parameters()), "heads": list(self.heads.parameters())}
