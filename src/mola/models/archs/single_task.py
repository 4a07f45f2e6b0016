"""Single-task networks: one independent encoder + head per task.

As ``single_task_joint`` the T networks are trained together in one run (each on its task's rows of one mixed
batch, one optimizer, one model selection). ``single_task`` names the same networks trained as the paper does,
one separate run per task (``mola.engine.single_task``); the engine builds this class per task for it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from mola.models.base import ARCHS, BackboneFactory, ModelConfig, MultiTaskModel, parse_options
from mola.models.heads import make_head
from mola.tasks import Heterogeneity, TaskInfo


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
        """Task t's encoder. A lone row in training keeps batch statistics wherever BatchNorm sees more than one
        value per channel (conv maps: the row's own spatial statistics); only a layer with a single value per
        channel (vector inputs), which BatchNorm cannot normalise, uses its running statistics. Using running
        statistics for the whole tower diverged: they lag the fast-moving weights of a task with 1-5 rows per
        batch (manytask's breast reached a non-finite loss at epoch 2)."""
        tower = self.towers[t]
        if x.shape[0] != 1 or not self.training:
            return tower(x)
        norms = [m for m in tower.modules() if isinstance(m, _BatchNorm) and m.training]
        hooks = [m.register_forward_pre_hook(_eval_if_single_value) for m in norms]
        try:
            return tower(x)
        finally:
            for h, m in zip(hooks, norms, strict=True):
                h.remove()
                m.train()

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"towers": list(self.towers.parameters()), "heads": list(self.heads.parameters())}


def _eval_if_single_value(module: nn.Module, args: tuple[Tensor, ...]) -> None:
    """Forward pre-hook: a BatchNorm input with one value per channel is normalised with running statistics."""
    x = args[0]
    if x.numel() == x.shape[1]:
        module.eval()
