"""Which modules MoLA wraps: peft-style name patterns, stage presets (last_stage, all_stages, stages:i,j)
and per-layer ranks."""

from __future__ import annotations

import difflib
import math
import re

from torch import nn

PRESETS = ("last_stage", "all_stages")


def pattern_matches(pattern: str, name: str) -> bool:
    """peft-style: equal, or ends with '.' + pattern; 're:...' is a regex fullmatched on the qualified name."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


STAGE_CONTAINERS = {"encoder.layers": "mlp", "blocks": "mlp", "transformer.resblocks": "mlp", "layers": "mlp",
                    "stages": "conv"}
"""Module lists that hold a backbone's stages (torchvision/timm ViTs, CLIP, Swin; timm ConvNets) and what the
``last_stage``-style presets wrap in them."""


def find_stages(model: nn.Module) -> tuple[list[str], str]:
    """Stage prefixes of a known backbone and what to wrap in them ('conv', 'mlp' or 'any'): the one stage
    detection of the package (inject presets, timm backbones). ValueError for an unknown layout."""
    custom = getattr(model, "mola_stages", None)
    if custom is not None:
        return list(custom), getattr(model, "mola_stage_modules", "any")
    names = dict(model.named_modules())
    if all(f"layer{i}" in names for i in (1, 2, 3)):
        return [f"layer{i}" for i in range(1, 5) if f"layer{i}" in names], "conv"
    for container, kind in STAGE_CONTAINERS.items():
        mod = names.get(container)
        if isinstance(mod, (nn.Sequential, nn.ModuleList)) and len(mod) > 0:
            return [f"{container}.{n}" for n, _ in mod.named_children()], kind
    raise ValueError(
        f"target_modules presets {PRESETS} know torchvision/timm ResNets and ViTs and models with a "
        f"`mola_stages` attribute; {type(model).__name__} is none of these: pass a list of module names"
    )


def _select_stages(prefixes: list[str], preset: str, kind: str) -> list[str]:
    if preset == "all_stages":
        return prefixes
    if preset == "last_stage":
        return prefixes[-max(1, math.ceil(len(prefixes) / 4)):] if kind == "mlp" else prefixes[-1:]
    if preset.startswith("stages:"):
        try:
            idx = [int(s) for s in preset[len("stages:"):].split(",") if s.strip()]
        except ValueError:
            idx = []
        if not idx or any(i < 1 or i > len(prefixes) for i in idx):
            raise ValueError(f"target_modules {preset!r}: expected 1-based stage numbers in 1..{len(prefixes)}")
        return [prefixes[i - 1] for i in idx]
    raise ValueError(f"unknown target_modules preset {preset!r}; presets: {list(PRESETS)} or 'stages:1,3'")


def _wrappable(model: nn.Module) -> dict[str, nn.Module]:
    """Conv2d/Linear modules MoLA can wrap (Linear layers that a parent reads as raw weights excluded)."""
    raw = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            raw.add(f"{name}.out_proj" if name else "out_proj")
    return {n: m for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear) and n not in raw}


def resolve_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Qualified names of the modules ``target_modules`` selects, in model order; errors name the problem."""
    wrappable = _wrappable(model)
    if isinstance(target_modules, str):
        prefixes, kind = find_stages(model)
        chosen = _select_stages(prefixes, target_modules, kind)
        out = []
        for n, m in wrappable.items():
            if not any(n.startswith(p + ".") for p in chosen):
                continue
            if kind == "conv" and not isinstance(m, nn.Conv2d):
                continue
            if kind == "mlp" and not (isinstance(m, nn.Linear) and ".mlp." in f".{n}."):
                continue
            out.append(n)
        if not out:
            raise ValueError(f"target_modules preset {target_modules!r} selected no module in {type(model).__name__}")
        return out
    if not isinstance(target_modules, (list, tuple)) or not target_modules:
        raise ValueError(f"target_modules must be a preset string or a non-empty list, got {target_modules!r}")
    all_names = [n for n, _ in model.named_modules() if n]
    selected: dict[str, None] = {}
    for pat in target_modules:
        hits = [n for n in all_names if pattern_matches(pat, n)]
        if not hits:
            close = difflib.get_close_matches(pat, list(wrappable), n=3)
            hint = f" Close names: {close}." if close else ""
            raise ValueError(f"target pattern {pat!r} matched no module of {type(model).__name__}.{hint}")
        for n in hits:
            if n not in wrappable:
                mod = model.get_submodule(n)
                why = (
                    "it is read as a raw weight by its nn.MultiheadAttention parent"
                    if isinstance(mod, nn.Linear)
                    else "MoLA wraps only nn.Conv2d and nn.Linear"
                )
                raise ValueError(f"cannot wrap module {n!r} ({type(mod).__name__}) matched by {pat!r}: {why}")
            selected[n] = None
    order = list(wrappable)
    return sorted(selected, key=order.index)


def rank_for(name: str, rank: int | dict[str, int]) -> int:
    if isinstance(rank, int):
        return rank
    for pat, r in rank.items():
        if pat != "*" and pattern_matches(pat, name):
            return r
    if "*" in rank:
        return rank["*"]
    raise ValueError(f"rank dict {rank} has no pattern for module {name!r} (add a '*' default)")

