"""Cross-stitch networks (Misra et al. 2016): one backbone column per task, linearly mixed after every stage.

Also home of the stage helpers the stage-wise baselines share (``backbone_stages``, ``stage_shapes``,
``stacked_task_outputs``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mola.models.backbones import MLP, ResNetBackbone, SmallCNN, SmallViT
from mola.models.base import ARCHS, BackboneFactory, ModelConfig, MultiTaskModel, parse_options
from mola.tasks import Heterogeneity, TaskInfo

# --- stage helpers -------------------------------------------------------------------------------------


class _ViTStem(nn.Module):
    """Patch embedding plus position embedding, returned as a (B, D, gh, gw) map."""

    def __init__(self, net: SmallViT) -> None:
        super().__init__()
        self.proj = net.patch_embed.proj
        self.pos_embed = net.pos_embed
        self.grid = net.grid

    def forward(self, x: Tensor) -> Tensor:
        pos = self.pos_embed.transpose(1, 2).reshape(1, -1, *self.grid)
        return self.proj(x) + pos


class _ViTStage(nn.Module):
    """A group of transformer blocks on a (B, D, gh, gw) token map; the last group adds the final norm/output."""

    def __init__(self, blocks: list[nn.Module], norm: nn.Module | None, dense: bool) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.norm = norm
        self.dense = dense

    def forward(self, x: Tensor) -> Tensor:
        b, d, gh, gw = x.shape
        tokens = self.blocks(x.flatten(2).transpose(1, 2))
        if self.norm is None:
            return tokens.transpose(1, 2).reshape(b, d, gh, gw)
        tokens = self.norm(tokens)
        if self.dense:
            return tokens.transpose(1, 2).reshape(b, d, gh, gw)
        return tokens.mean(dim=1)


def backbone_stages(net: nn.Module, vit_groups: int = 4) -> nn.ModuleDict:
    """Split a backbone into ordered stages (``stem``, ``layer1``..``layerN``) whose composition is ``net(x)``.

    The stages reuse ``net``'s modules (no copy). MLPs have no stem (flattening happens in ``layer1``); a
    SmallViT's blocks are grouped into ``vit_groups`` stages that pass (B, D, gh, gw) token maps.
    """
    if isinstance(net, ResNetBackbone):
        stem: nn.Module = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        return nn.ModuleDict([("stem", stem)] + [(f"layer{i}", getattr(net, f"layer{i}")) for i in range(1, 5)])
    if isinstance(net, SmallCNN):
        stem = nn.Sequential(net.conv1, net.bn1, nn.ReLU())
        return nn.ModuleDict([("stem", stem)] + [(f"layer{i}", getattr(net, f"layer{i}")) for i in range(1, 5)])
    if isinstance(net, MLP):
        names = list(net.mola_stages)
        first = nn.Sequential(nn.Flatten(1), *getattr(net, names[0]))
        return nn.ModuleDict([(names[0], first)] + [(n, getattr(net, n)) for n in names[1:]])
    if isinstance(net, SmallViT):
        blocks = list(net.blocks)
        groups = max(1, min(vit_groups, len(blocks)))
        bounds = [round(i * len(blocks) / groups) for i in range(groups + 1)]
        stages: list[tuple[str, nn.Module]] = [("stem", _ViTStem(net))]
        for g in range(groups):
            last = g == groups - 1
            stages.append((f"layer{g + 1}", _ViTStage(blocks[bounds[g]:bounds[g + 1]],
                                                       net.norm if last else None, net.dense)))
        return nn.ModuleDict(stages)
    raise ValueError(
        f"stage-wise architectures (cross_stitch, mmoe, cgc, dselect_k, ltb, mtan) cannot split backbone "
        f"{type(net).__name__} into stages; supported: resnet18, resnet50, small_cnn, mlp, vit_small"
    )


def stage_slice(stages: nn.ModuleDict, start: int, stop: int | None = None) -> nn.ModuleDict:
    """Stages ``start:stop`` as a new ModuleDict (modules shared, not copied)."""
    return nn.ModuleDict(list(stages.items())[start:stop])


def run_stages(stages: nn.ModuleDict, x: Tensor) -> Tensor:
    """Apply the stages in order."""
    for m in stages.values():
        x = m(x)
    return x


@torch.no_grad()
def stage_shapes(stages: nn.ModuleDict, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Output shape (without batch) of every stage, from one dry run in eval mode on zeros."""
    modes = [(m, m.training) for m in stages.modules()]
    stages.eval()
    try:
        h = torch.zeros(2, *input_shape)
        shapes = []
        for m in stages.values():
            h = m(h)
            shapes.append(tuple(h.shape[1:]))
    finally:
        for m, mode in modes:
            m.training = mode
    return shapes


def stacked_task_outputs(model: MultiTaskModel, feats: Tensor, task_ids: Tensor,
                         out_size: tuple[int, int] | None) -> dict[int, Tensor]:
    """Heads on per-task features ``feats`` (T, B, ...): task t's head reads ``feats[t]`` (its rows only
    for domain / multi-input data)."""
    if model.single_input:
        return {t: model.head(t)(feats[t], out_size) for t in range(model.num_tasks)}
    return {t: model.head(t)(feats[t].index_select(0, rows), out_size)
            for t, rows in model.task_rows(task_ids).items()}


# --- cross-stitch ----------------------------------------------------------------------------------------


@dataclass
class CrossStitchOptions:
    """``alpha_self``: initial weight of a column on itself (the T-1 others share the rest equally);
    ``per_channel``: one T x T mixing matrix per channel (True) or one per stage (False)."""

    alpha_self: float = 0.9  # initial weight of a column on itself
    per_channel: bool = True  # one T x T mixing matrix per channel (else one per stage)


def stitch_init(num_tasks: int, channels: int, alpha_self: float) -> Tensor:
    """(channels, T, T) mixing matrices: alpha_self on the diagonal, (1 - alpha_self) / (T - 1) elsewhere."""
    if num_tasks == 1:
        return torch.ones(channels, 1, 1)
    off = (1.0 - alpha_self) / (num_tasks - 1)
    a = torch.full((num_tasks, num_tasks), off)
    a.fill_diagonal_(alpha_self)
    return a.expand(channels, -1, -1).clone()


@ARCHS.register("cross_stitch")
class CrossStitch(MultiTaskModel):
    """T backbone columns run stage by stage; after every stage (stem included) a cross-stitch unit replaces
    column t's output by sum_u alpha[c, t, u] * column u's output (per channel c by default). Every column runs
    on every sample (the units mix all columns); task t's head reads column t.

    ``self.features`` is the (T, B, ...) stack of the stitched last-stage outputs: columns and units lie below
    it, heads above. Columns are shared parameters (they reach every task through the units). Misra et al.
    train alpha with a larger learning rate: give the ``stitch`` group its own rate to reproduce that.
    """

    Options = CrossStitchOptions
    task_specific_groups = ("heads",)

    def __init__(self, backbone: BackboneFactory, tasks: list[TaskInfo], heterogeneity: Heterogeneity,
                 shared_head: bool, input_shape: tuple[int, ...], cfg: ModelConfig) -> None:
        super().__init__(tasks, heterogeneity, shared_head, input_shape)
        o = parse_options(CrossStitchOptions, cfg.options, "cross_stitch")
        if not 0.0 <= o.alpha_self <= 1.0:
            raise ValueError(f"arch 'cross_stitch': alpha_self must be in [0, 1], got {o.alpha_self}")
        self.options = o
        nets = [backbone() for _ in tasks]
        self.columns = nn.ModuleList([backbone_stages(n) for n in nets])
        shapes = stage_shapes(self.columns[0], self.input_shape)
        self.stitches = nn.ParameterList([
            nn.Parameter(stitch_init(self.num_tasks, s[0] if o.per_channel else 1, o.alpha_self)) for s in shapes
        ])
        self.heads = self.make_heads(nets[0].out_dim, cfg.head_hidden)

    def stitch(self, s: int, outs: Tensor) -> Tensor:
        """Cross-stitch unit ``s`` on stacked column outputs (T, B, C, ...)."""
        alpha = self.stitches[s]
        alpha = alpha.expand(outs.shape[2], -1, -1)
        return torch.einsum("ctu,ubc...->tbc...", alpha, outs)

    def forward(self, x: Tensor, task_ids: Tensor) -> dict[int, Tensor]:
        names = list(self.columns[0].keys())
        h: Tensor | list[Tensor] = [x] * self.num_tasks
        for s, name in enumerate(names):
            outs = torch.stack([col[name](h[t]) for t, col in enumerate(self.columns)])
            h = self.stitch(s, outs)
        assert isinstance(h, Tensor)
        self.features = h
        return stacked_task_outputs(self, h, task_ids, self.out_size(x))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": list(self.columns.parameters()), "stitch": list(self.stitches),
                "heads": list(self.heads.parameters())}
