"""Learning to Branch (Guo et al. 2020): a tree over backbone stages whose branching is learned with
Gumbel-softmax. Stage s holds B_s copies of the stage module (nodes); every node of stage s >= 1 and every
task leaf (head) picks one parent among the previous level's nodes through its own learned distribution."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mola.models.archs.cross_stitch import backbone_stages, stacked_task_outputs
from mola.models.base import ARCHS, BackboneFactory, ModelConfig, MultiTaskModel, parse_options
from mola.tasks import Heterogeneity, TaskInfo


def _sync_temperature(module: nn.Module, incompatible_keys: object) -> None:
    module.temperature = float(module.tau)


@dataclass
class LTBOptions:
    """``branches``: nodes per stage (default 1 for the first stage, T after: the paper's fully branched
    design space); Gumbel temperature ``tau``, multiplied by exp(-anneal_rate) after every training forward
    down to ``tau_min`` (or set by ``set_temperature``); ``hard_train``: straight-through one-hot samples."""

    branches: list[int] | None = None  # nodes per stage (null: 1 for the first stage, T after)
    tau: float = 5.0  # initial Gumbel-softmax temperature
    tau_min: float = 0.5  # lowest temperature of the annealing
    anneal_rate: float = 1e-3  # temperature multiplied by exp(-anneal_rate) per training forward
    hard_train: bool = False  # straight-through one-hot samples in training
    eval_argmax: bool = False  # eval runs only the argmax paths (the pruned final network; see the class)


@ARCHS.register("ltb")
class LTB(MultiTaskModel):
    """Training: each child's input is the Gumbel-softmax-weighted sum of its parents' outputs (one sample per
    forward, shared by the batch), so every node runs on every sample. Eval: the same mixture without the
    Gumbel noise, softmax(logits / temperature); with ``eval_argmax`` each child takes its argmax parent and
    only the nodes on the T argmax paths run (the paper's final, pruned network).

    The argmax eval is meaningful once the branch probabilities have peaked. Before that it runs a network that
    training never ran: at the default temperatures (tau 5, annealed by exp(-1e-3) per step) the probabilities
    stay near uniform for thousands of steps, and on the 8-task benchmark the argmax eval of a 10-epoch run was
    at chance (37.4% mean accuracy) where the soft eval of the same weights scored far above it.

    ``self.features`` is the (T, B, ...) stack of the leaves' inputs. Branching logits form the ``branching``
    group (the paper trains them with their own optimizer; give the group its own learning rate).
    """

    Options = LTBOptions
    task_specific_groups = ("heads",)

    def __init__(self, backbone: BackboneFactory, tasks: list[TaskInfo], heterogeneity: Heterogeneity,
                 shared_head: bool, input_shape: tuple[int, ...], cfg: ModelConfig) -> None:
        super().__init__(tasks, heterogeneity, shared_head, input_shape)
        o = parse_options(LTBOptions, cfg.options, "ltb")
        first = backbone()
        names = list(backbone_stages(first).keys())
        branches = o.branches if o.branches is not None else [1] + [self.num_tasks] * (len(names) - 1)
        if len(branches) != len(names) or min(branches) < 1:
            raise ValueError(f"arch 'ltb': branches needs one count >= 1 per stage {names}, got {branches}")
        if o.tau <= 0 or o.tau_min <= 0 or o.anneal_rate < 0:
            raise ValueError(f"arch 'ltb': need tau > 0, tau_min > 0, anneal_rate >= 0, got {o}")
        self.options, self.branches = o, list(branches)
        nets = [first] + [backbone() for _ in range(max(branches) - 1)]
        stage_lists = [backbone_stages(n) for n in nets]
        self.nodes = nn.ModuleList([
            nn.ModuleList([stage_lists[j][name] for j in range(b)]) for name, b in zip(names, branches, strict=True)
        ])
        self.branch_logits = nn.ParameterDict()
        for s in range(1, len(names)):
            if branches[s - 1] > 1:
                self.branch_logits[f"stage{s}"] = nn.Parameter(torch.zeros(branches[s], branches[s - 1]))
        if branches[-1] > 1:
            self.branch_logits["heads"] = nn.Parameter(torch.zeros(self.num_tasks, branches[-1]))
        self.temperature = float(o.tau)  # the value used; mirrored in the ``tau`` buffer for checkpoints
        self.register_buffer("tau", torch.tensor(self.temperature))
        self.register_load_state_dict_post_hook(_sync_temperature)
        self.heads = self.make_heads(first.out_dim, cfg.head_hidden)

    def set_temperature(self, tau: float) -> None:
        """Set the Gumbel-softmax temperature used by the next training forwards."""
        if tau <= 0:
            raise ValueError(f"arch 'ltb': temperature must be > 0, got {tau}")
        self.temperature = float(tau)
        self.tau.fill_(self.temperature)

    def _level_keys(self) -> list[str]:
        return [f"stage{s}" for s in range(1, len(self.branches))] + ["heads"]

    def _choice_weights(self, key: str) -> Tensor | None:
        """(children, parents) mixing weights of one level, or None for a single parent: a Gumbel-softmax sample
        in training, the noise-free softmax(logits / temperature) in eval."""
        if key not in self.branch_logits:
            return None
        if not self.training:
            return F.softmax(self.branch_logits[key] / self.temperature, dim=-1)
        return F.gumbel_softmax(self.branch_logits[key], tau=self.temperature, hard=self.options.hard_train, dim=-1)

    def parents(self) -> list[list[int]]:
        """Argmax parent of every child, per level (stage 1.., then the task leaves)."""
        out = []
        for key, children in zip(self._level_keys(), self.branches[1:] + [self.num_tasks], strict=True):
            out.append(self.branch_logits[key].argmax(-1).tolist() if key in self.branch_logits else [0] * children)
        return out

    def paths(self) -> list[list[int]]:
        """Each task's argmax node index per stage (what eval runs)."""
        levels = self.parents()
        result = []
        for t in range(self.num_tasks):
            node, path = levels[-1][t], []
            for s in range(len(self.branches) - 1, -1, -1):
                path.append(node)
                if s > 0:
                    node = levels[s - 1][node]
            result.append(path[::-1])
        return result

    def _forward_soft(self, x: Tensor) -> Tensor:
        outs = [node(x) for node in self.nodes[0]]
        for key, children, level in zip(self._level_keys(), self.branches[1:] + [self.num_tasks],
                                        list(self.nodes[1:]) + [None], strict=True):
            w = self._choice_weights(key)
            stacked = torch.stack(outs)
            inputs = stacked.expand(children, *stacked.shape[1:]) if w is None else \
                torch.einsum("cp,pb...->cb...", w, stacked)
            if level is None:
                return inputs
            outs = [node(inputs[c]) for c, node in enumerate(level)]
        raise AssertionError("unreachable")

    def _forward_hard(self, x: Tensor) -> Tensor:
        levels = self.parents()
        needed = [set() for _ in self.branches]
        needed[-1] = set(levels[-1])
        for s in range(len(self.branches) - 1, 0, -1):
            needed[s - 1] = {levels[s - 1][c] for c in needed[s]}
        outs = {j: self.nodes[0][j](x) for j in sorted(needed[0])}
        for s in range(1, len(self.branches)):
            outs = {c: self.nodes[s][c](outs[levels[s - 1][c]]) for c in sorted(needed[s])}
        return torch.stack([outs[p] for p in levels[-1]])

    def forward(self, x: Tensor, task_ids: Tensor) -> dict[int, Tensor]:
        if self.training:
            feats = self._forward_soft(x)
            o = self.options
            if o.anneal_rate > 0 and self.temperature > o.tau_min:
                self.set_temperature(max(o.tau_min, self.temperature * math.exp(-o.anneal_rate)))
        else:
            feats = self._forward_hard(x) if self.options.eval_argmax else self._forward_soft(x)
        self.features = feats
        return stacked_task_outputs(self, feats, task_ids, self.out_size(x))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": list(self.nodes.parameters()), "branching": list(self.branch_logits.values()),
                "heads": list(self.heads.parameters())}
