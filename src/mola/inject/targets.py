"""Which modules MoLA wraps: peft-style name patterns, stage presets (last_stage, all_stages, stages:i,j)
and per-layer ranks."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence

import torch
from torch import nn

PRESETS = ("last_stage", "all_stages")


def pattern_matches(pattern: str, name: str) -> bool:
    """peft-style: equal, or ends with '.' + pattern; 're:...' is a regex fullmatched on the qualified name."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


STAGE_CONTAINERS = {"encoder.layers": "mlp", "blocks": "mlp", "transformer.resblocks": "mlp", "layers": "mlp",
                    "stages": "conv", "features": "any"}
"""Module lists that hold a backbone's stages (torchvision/timm ViTs, CLIP, Swin; timm ConvNets; torchvision
MobileNet/EfficientNet/ConvNeXt/VGG ``features``) and what the ``last_stage``-style presets wrap in them."""

RESOLUTION_CONTAINERS = ("features", "blocks")
"""Containers whose children are grouped into stages by the resolution of their output feature maps (a stage
ends where the map shrinks), the rule timm's ``feature_info`` encodes; token models (ViT blocks) keep one
child per stage."""

PROBE_SIZE = 64
"""Side of the zero image run through a model once to read its children's output resolutions."""


def _group_by_resolution(model: nn.Module, container: nn.Module, prefix: str) -> list[list[str]] | None:
    """Children of ``container`` grouped into runs of equal output resolution (one forward of a zero image of
    ``PROBE_SIZE`` px, in eval mode, without gradients); None when a child's output is not a feature map or
    the model does not run on such an image."""
    children = list(container.named_children())
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None or not children:
        return None
    param = next(model.parameters(), None)
    x = torch.zeros(1, first.in_channels, PROBE_SIZE, PROBE_SIZE,
                    device=param.device if param is not None else None,
                    dtype=param.dtype if param is not None and param.is_floating_point() else None)
    sizes: dict[str, tuple[int, ...] | None] = {}
    hooks = [m.register_forward_hook(
        lambda _m, _i, out, n=n: sizes.__setitem__(n, tuple(out.shape[-2:]) if isinstance(out, torch.Tensor)
                                                   and out.dim() == 4 else None)) for n, m in children]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    except Exception:  # noqa: BLE001 - a model that needs other inputs simply has no resolution stages
        return None
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    if len(sizes) != len(children) or any(v is None for v in sizes.values()):
        return None
    groups: list[list[str]] = []
    last: tuple[int, ...] | None = None
    for n, _ in children:
        if sizes[n] != last:
            groups.append([])
            last = sizes[n]
        groups[-1].append(f"{prefix}.{n}")
    return groups


def find_stage_groups(model: nn.Module) -> tuple[list[list[str]], str]:
    """The backbone's stages, each a list of module prefixes, and what to wrap in them ('conv', 'mlp' or
    'any'): ``mola_stages`` of the model, torchvision ResNets' layer1..4, the known stage containers (CNN
    feature stacks grouped by output resolution). ValueError listing the candidate layers otherwise."""
    custom = getattr(model, "mola_stages", None)
    if custom is not None:
        return [[c] if isinstance(c, str) else list(c) for c in custom], getattr(model, "mola_stage_modules", "any")
    names = dict(model.named_modules())
    if all(f"layer{i}" in names for i in (1, 2, 3)):
        return [[f"layer{i}"] for i in range(1, 5) if f"layer{i}" in names], "conv"
    for container, kind in STAGE_CONTAINERS.items():
        mod = names.get(container)
        if not (isinstance(mod, (nn.Sequential, nn.ModuleList)) and len(mod) > 0):
            continue
        if container in RESOLUTION_CONTAINERS and isinstance(mod, nn.Sequential):
            groups = _group_by_resolution(model, mod, container)
            if groups is not None:
                return groups, "any"
        if container == "features":
            continue
        return [[f"{container}.{n}"] for n, _ in mod.named_children()], kind
    raise ValueError(
        f"target_modules presets {list(PRESETS)} know torchvision/timm ResNets, CNN feature stacks and ViTs and "
        f"models with a `mola_stages` attribute; {type(model).__name__} is none of these: name the layers "
        f"instead (a name, 're:<regex>' or a list). {candidate_text(model)}"
    )


def find_stages(model: nn.Module) -> tuple[list[str], str]:
    """Module prefixes of the backbone's stages in order (``find_stage_groups`` flattened) and what to wrap."""
    groups, kind = find_stage_groups(model)
    return [p for g in groups for p in g], kind


def candidate_text(model: nn.Module, limit: int = 40) -> str:
    """The Conv2d/Linear layers MoLA can wrap, as one sentence for error messages."""
    layers = [f"{n} ({type(m).__name__})" for n, m in _wrappable(model).items()]
    more = f", ... ({len(layers) - limit} more; `mola layers --config CFG` lists them all)" if len(layers) > limit \
        else ""
    return f"Candidate layers: {', '.join(layers[:limit])}{more}." if layers else "It has no Conv2d/Linear layer."


def is_preset(target: str) -> bool:
    """True for the stage presets (last_stage, all_stages, stages:i,j); other strings are module patterns."""
    return target in PRESETS or target.startswith("stages:")


def _select_stages(groups: Sequence[list[str]], preset: str, kind: str) -> list[str]:
    prefixes = [p for g in _select_groups(list(groups), preset, kind) for p in g]
    return prefixes


def _select_groups(prefixes: list[list[str]], preset: str, kind: str) -> list[list[str]]:
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
    if isinstance(target_modules, str) and not is_preset(target_modules):
        target_modules = [target_modules]  # one module name or "re:" pattern
    if isinstance(target_modules, str):
        return _preset_targets(model, target_modules, wrappable)
    if not isinstance(target_modules, (list, tuple)) or not target_modules:
        raise ValueError(f"target_modules must be a preset string or a non-empty list, got {target_modules!r}")
    return _pattern_targets(model, list(target_modules), wrappable)


def _preset_targets(model: nn.Module, preset: str, wrappable: dict[str, nn.Module]) -> list[str]:
    """The wrappable modules of the stages a preset (``last_stage``, ``stages:1,3``, ...) selects."""
    groups, kind = find_stage_groups(model)
    chosen = _select_stages(groups, preset, kind)
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
        raise ValueError(f"target_modules preset {preset!r} selected no module in "
                         f"{type(model).__name__} (stages {chosen}). {candidate_text(model)}")
    return out


def _pattern_targets(model: nn.Module, patterns: list[str], wrappable: dict[str, nn.Module]) -> list[str]:
    """The modules that peft-style names / ``re:`` patterns match; each must match and be wrappable."""
    all_names = [n for n, _ in model.named_modules() if n]
    selected: dict[str, None] = {}
    for pat in patterns:
        hits = [n for n in all_names if pattern_matches(pat, n)]
        if not hits:
            close = difflib.get_close_matches(pat, list(wrappable), n=3)
            hint = f" Close names: {close}." if close else ""
            raise ValueError(f"target pattern {pat!r} matched no module of {type(model).__name__}.{hint} "
                             f"{candidate_text(model)} (Stage presets: {', '.join(PRESETS)}, 'stages:1,3'.)")
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

