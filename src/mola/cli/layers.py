"""``mola layers``: the Conv2d/Linear layers of a config's backbone that MoLA can wrap, grouped by stage (as the
``last_stage`` / ``all_stages`` / ``stages:i,j`` presets see them), the adapter parameters each would add with the
config's rank and number of adapters, and which ones ``model.mola.target_modules`` selects."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any


def layer_table(cfg: Any, synthetic: bool = False) -> list[str]:
    """Lines of the ``mola layers`` listing for a RunConfig (builds the data or its stand-in and the backbone)."""
    from mola.data import build_scenario
    from mola.data.synthetic import scenario_spec
    from mola.inject import MoLAConfig, adapter_budget, find_stage_groups, resolve_targets
    from mola.inject.config import RankTooLargeError
    from mola.inject.targets import _wrappable
    from mola.models import build_backbone

    spec = scenario_spec(cfg.data) if synthetic else None
    if synthetic and spec is None:
        raise ValueError(f"--synthetic: data.kind {cfg.data.kind} declares no shape; drop --synthetic")
    tasks = spec.tasks if spec is not None else None
    shape = spec.input_shape if spec is not None else None
    if spec is None:
        scenario = build_scenario(cfg.data)
        tasks, shape = scenario.tasks, scenario.input_shape
    assert tasks is not None and shape is not None
    backbone_cfg = dataclasses.replace(cfg.model.backbone, weights=None)  # shapes only: no weights loaded
    net = build_backbone(backbone_cfg, tuple(shape), any(t.kind != "classification" for t in tasks))
    mcfg = cfg.model.mola
    experts = mcfg.num_experts or (max(mcfg.task_to_expert) + 1 if mcfg.task_to_expert else len(tasks))
    mcfg = MoLAConfig.from_dict({**mcfg.to_dict(), "num_experts": experts})
    try:
        selected = set(resolve_targets(net, mcfg.target_modules))
        note = f"* = selected by model.mola.target_modules={mcfg.target_modules!r}"
    except ValueError as err:
        selected, note = set(), f"model.mola.target_modules={mcfg.target_modules!r} selects nothing: {err}"
    try:
        groups, kind = find_stage_groups(net)
    except ValueError:
        groups, kind = [], "any"
    layers = _wrappable(net)
    lines = [f"backbone {cfg.model.backbone.name} on input {list(shape)}: {len(layers)} Conv2d/Linear layers; "
             f"adapters: {experts} x rank {mcfg.rank} ({mcfg.layout} layout); stage presets wrap {kind} layers",
             note]
    placed: set[str] = set()
    total = 0
    sections = [(f"stage {i + 1} ({', '.join(g)})", g) for i, g in enumerate(groups)] + [("outside the stages", [])]
    for title, prefixes in sections:
        names = [n for n in layers if n not in placed
                 and (not prefixes or any(n == p or n.startswith(p + ".") for p in prefixes))]
        if not names:
            continue
        lines.append(f"{title}:")
        for n in names:
            placed.add(n)
            m = layers[n]
            w = tuple(m.weight.shape)
            try:
                size = f"+{adapter_budget(net, [n], mcfg):,} adapter params"
            except RankTooLargeError:
                size = "rank too large for this layer"
            if n in selected:
                total += adapter_budget(net, [n], mcfg)
            lines.append(f"  {'*' if n in selected else ' '} {n:40s} {type(m).__name__} {list(w)}  {size}")
    lines.append(f"selected: {len(selected)} layers, {total:,} adapter parameters")
    return lines


def cmd_layers(args: argparse.Namespace) -> int:
    from mola.engine import load_config

    cfg = load_config(args.config, args.overrides)
    print("\n".join(layer_table(cfg, synthetic=args.synthetic)))
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``mola layers``."""
    p = subparsers.add_parser("layers", help="a config's backbone layers MoLA can wrap, by stage, with adapter sizes",
                              description=__doc__)
    p.add_argument("--config", "-c", required=True, help="YAML run config: a path or a shipped config's name")
    p.add_argument("--synthetic", action="store_true",
                   help="take the input shape and tasks from the layout's declared shape (no data read)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. model.backbone.name=resnet18")
    p.set_defaults(func=cmd_layers)


__all__ = ["add_parser", "cmd_layers", "layer_table"]
