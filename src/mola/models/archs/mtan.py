"""Multi-Task Attention Network (Liu et al. 2019): a shared backbone plus, per task, a soft attention mask on
the shared output of every stage, the attended features being carried from stage to stage."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mola.models.archs.cross_stitch import backbone_stages, stage_shapes
from mola.models.base import ARCHS, BackboneFactory, ModelConfig, MultiTaskModel, parse_options
from mola.tasks import Heterogeneity, TaskInfo


def _attention(cin: int, cout: int, hidden: int, vector: bool) -> nn.Sequential:
    """Mask logits g -> h: conv1x1-BN-ReLU then conv1x1 (Linear-ReLU-Linear for vectors); sigmoid applied after."""
    if vector:
        return nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(), nn.Linear(hidden, cout))
    return nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
                         nn.Conv2d(hidden, cout, 1))


class _Carry(nn.Module):
    """The shared f block: previous attended features to the next stage's channels and resolution
    (3x3 conv-BN-ReLU with the stage's stride; Linear-ReLU, after global pooling of maps, for vector stages)."""

    def __init__(self, cin: int, cout: int, stride: int, vector: bool) -> None:
        super().__init__()
        self.vector = vector
        self.net = nn.Sequential(nn.Linear(cin, cout), nn.ReLU()) if vector else nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    def forward(self, a: Tensor, like: Tensor) -> Tensor:
        if self.vector and a.dim() == 4:
            a = a.mean(dim=(2, 3))
        y = self.net(a)
        if y.dim() == 4 and y.shape[-2:] != like.shape[-2:]:
            y = F.adaptive_avg_pool2d(y, like.shape[-2:])
        return y


@dataclass
class MTANOptions:
    """``reduction``: hidden width of the attention modules = stage channels // reduction."""

    reduction: int = 1  # attention hidden width = stage channels // reduction


@ARCHS.register("mtan")
class MTAN(MultiTaskModel):
    """Per stage s (stem excluded) with shared output p_s, task t computes the mask
    a = sigmoid(h_t(g_t([p_s, f_s(attended_{s-1})]))) (just p_s at the first stage) and attended_s = a * p_s;
    task t's head reads its last attended features. The paper feeds g an intermediate feature of the block; we
    feed the block output p_s. f_s is shared by the tasks (as in the paper); g_t, h_t are per task.

    Attention runs only on a task's rows for domain / multi-input data (on the batch, in training, for a task
    with a single row: BatchNorm needs two). ``self.features`` is what the heads
    read: (T, B, ...) stacked for single-input, the present tasks' rows concatenated in task order otherwise
    (the attention modules lie below it). ``self.masks[t]`` holds task t's masks of the last forward.
    """

    Options = MTANOptions
    task_specific_groups = ("heads", "attention")

    def __init__(self, backbone: BackboneFactory, tasks: list[TaskInfo], heterogeneity: Heterogeneity,
                 shared_head: bool, input_shape: tuple[int, ...], cfg: ModelConfig) -> None:
        super().__init__(tasks, heterogeneity, shared_head, input_shape)
        o = parse_options(MTANOptions, cfg.options, "mtan")
        if o.reduction < 1:
            raise ValueError(f"arch 'mtan': reduction must be >= 1, got {o.reduction}")
        net = backbone()
        self.stages = backbone_stages(net)
        shapes = stage_shapes(self.stages, self.input_shape)
        self.attended = [i for i, name in enumerate(self.stages.keys()) if name != "stem"]
        att_shapes = [shapes[i] for i in self.attended]
        self.carry = nn.ModuleList([
            _Carry(prev[0], cur[0], 1 if len(cur) == 1 else max(1, round(prev[-1] / cur[-1])), len(cur) == 1)
            for prev, cur in zip(att_shapes[:-1], att_shapes[1:], strict=True)
        ])
        self.attention = nn.ModuleList([
            nn.ModuleList([_attention(s[0] * (1 if i == 0 else 2), s[0], max(1, s[0] // o.reduction), len(s) == 1)
                           for i, s in enumerate(att_shapes)])
            for _ in tasks
        ])
        self.heads = self.make_heads(net.out_dim, cfg.head_hidden)
        self.masks: dict[int, list[Tensor]] = {}

    def shared_forward(self, x: Tensor) -> list[Tensor]:
        """Shared outputs of the attended stages."""
        outs = []
        for m in self.stages.values():
            x = m(x)
            outs.append(x)
        return [outs[i] for i in self.attended]

    def attend(self, t: int, shared: list[Tensor]) -> Tensor:
        """Task t's attended last-stage features from the shared stage outputs (same rows)."""
        a: Tensor | None = None
        masks = []
        for i, p in enumerate(shared):
            inp = p if a is None else torch.cat([p, self.carry[i - 1](a, p)], dim=1)
            mask = torch.sigmoid(self.attention[t][i](inp))
            masks.append(mask.detach())
            a = mask * p
        self.masks[t] = masks
        assert a is not None
        return a

    def forward(self, x: Tensor, task_ids: Tensor) -> dict[int, Tensor]:
        size = self.out_size(x)
        shared = self.shared_forward(x)
        self.masks = {}
        if self.single_input:
            feats = torch.stack([self.attend(t, shared) for t in range(self.num_tasks)])
            self.features = feats
            return {t: self.head(t)(feats[t], size) for t in range(self.num_tasks)}
        rows = self.task_rows(task_ids)
        parts = []
        for t, r in rows.items():
            if self.training and len(r) == 1:  # BatchNorm needs 2+ samples: attend on the batch, keep the row
                parts.append(self.attend(t, shared).index_select(0, r))
                self.masks[t] = [m.index_select(0, r) for m in self.masks[t]]
            else:
                parts.append(self.attend(t, [p.index_select(0, r) for p in shared]))
        # the shared representation in batch order (rows aligned with task_ids); the heads read from it
        order = torch.cat(list(rows.values()))
        feats = torch.cat(parts)
        feats = feats.new_zeros(feats.shape).index_copy(0, order, feats)
        self.features = feats
        return self.apply_heads(feats, task_ids, size)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": list(self.stages.parameters()), "attention_shared": list(self.carry.parameters()),
                "attention": list(self.attention.parameters()), "heads": list(self.heads.parameters())}
