"""Deployment of a trained MoLA model: fold one task's adapter into a plain torch model, save it in a format that
loads without mola, and write peft-compatible LoRA adapters (one per task) for the plain backbone.

- ``export_merged(model, t, weights=None)``: every MoLA layer replaced by its base Conv2d/Linear with
  W0 + s * B_t A_t (or W0 + s * sum_e w_e B_e A_e for given mixing weights w), router and lift dropped; equals the
  MoLA model with its routing forced to one-hot(t) (task ids t) or to w. A router model's own output mixes the
  adapters per input, and its expert t is not bound to task t: ``mola export`` folds in the task's mean router
  weights (``task_centroids.json``), an approximation whose error it reports.
- ``save_merged(module, example, path, fmt)``: ``pt2`` (``torch.export``, batch dimension dynamic), ``torchscript``
  (``torch.jit.trace``) or ``safetensors`` (the state dict only; needs the module's class to load).
- ``export_peft(model, t, out_dir, weights=None)``: ``adapter_config.json`` + ``adapter_model.safetensors`` with
  peft's key names (``base_model.model.<module>.lora_A.weight``) for the plain backbone ``base_model(model)``;
  peft's scaling lora_alpha / r equals MoLA's alpha / r, so ``lora_alpha = alpha`` and ``use_rslora = false``. A
  mixture sum_e w_e B_e A_e is exactly a LoRA of rank E*r (A stacked, B scaled and concatenated, lora_alpha E*alpha).

Imports only mola.layers, mola.models and mola.inject (no engine, no CLI).
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mola.files import atomic_write
from mola.inject import MoLAModel, find_mola_model, set_submodule
from mola.layers import MoLAConv2d, MoLALayer
from mola.models.base import MultiTaskModel

FORMATS = ("pt2", "torchscript", "safetensors")
FORMAT_FILES = {"pt2": "model.pt2", "torchscript": "model.torchscript.pt", "safetensors": "model.safetensors"}
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


class TaskModel(nn.Module):
    """A plain single-task model: ``head(backbone(x), (H, W))``: what a multi-task model computes for one task."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        out_size = (x.shape[-2], x.shape[-1]) if x.dim() == 4 else None
        return self.head(self.backbone(x), out_size)


# -- finding the parts ---------------------------------------------------------------------------------------
def single_mola_model(model: nn.Module) -> MoLAModel:
    """The one MoLAModel (injected wrapper) of ``model`` (itself or e.g. the ``mola`` arch's ``MoLANet.encoder``);
    a ValueError when there is none or more than one (``inject.find_mola_model`` returns the first or None)."""
    found = find_mola_model(model)
    if found is None or (found is not model and sum(isinstance(m, MoLAModel) for m in model.modules()) != 1):
        what = "no" if found is None else "more than one"
        raise ValueError(f"export needs a model with exactly one MoLA model inside; {type(model).__name__} has {what}")
    return found


find_mola = single_mola_model  # the earlier name, kept for callers of the public API


def task_names(model: nn.Module) -> list[str]:
    """Task names of a multi-task model, or "0".."E-1" for a bare MoLAModel."""
    if isinstance(model, MultiTaskModel):
        return [t.name for t in model.tasks]
    return [str(e) for e in range(single_mola_model(model).num_experts)]


def resolve_task(task: int | str, names: Sequence[str]) -> int:
    """A task index from an index or a name (a numeric string that is not a name is an index)."""
    if isinstance(task, bool):
        raise ValueError(f"task must be a name or an index, got {task!r}")
    if isinstance(task, str):
        if task in names:
            return list(names).index(task)
        if not task.lstrip("-").isdigit():
            raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(names)} "
                             f"(or an index 0..{len(names) - 1})")
        task = int(task)
    if not isinstance(task, int) or not 0 <= task < len(names):
        raise ValueError(f"task index {task!r} out of range [0, {len(names)}); valid tasks: {', '.join(names)}")
    return task


def _mola_encoder_and_head(model: nn.Module, task: int,
                           weights: Tensor | None = None) -> tuple[MoLAModel, nn.Module | None]:
    encoder = model if isinstance(model, MoLAModel) else getattr(model, "encoder", None)
    if not isinstance(encoder, MoLAModel) or not (encoder is model or isinstance(model, MultiTaskModel)):
        raise ValueError(f"export needs a MoLAModel or a MoLA architecture (model.arch=mola), got "
                         f"{type(model).__name__}")
    mapped = encoder.config.task_to_expert is not None  # merge(t) folds in task t's (shared) adapter
    if weights is None and isinstance(model, MultiTaskModel) and encoder.num_experts != model.num_tasks and not mapped:
        raise ValueError(f"the model has {encoder.num_experts} adapters for {model.num_tasks} tasks: adapter t is "
                         "not task t's; pass the mixing weights to fold in (weights=...)")
    if weights is not None and tuple(weights.shape) != (encoder.num_experts,):
        raise ValueError(f"weights must have shape ({encoder.num_experts},), got {tuple(weights.shape)}")
    return encoder, (model.head(task) if isinstance(model, MultiTaskModel) else None)


def merge_mixture(encoder: MoLAModel, weights: Tensor) -> nn.Module:
    """A plain copy of ``encoder``'s wrapped model with W0 + s * sum_e w_e dW_e in every MoLA layer."""
    layers = encoder.mola_layers()
    merged: dict[str, nn.Module] = {}
    with torch.no_grad():
        for n, layer in layers.items():
            base = copy.deepcopy(layer.base_layer)
            dw = layer.delta_weights()
            w = weights.to(device=dw.device, dtype=dw.dtype)
            base.weight.copy_(layer.weight + layer.scaling * torch.tensordot(w, dw, dims=1))
            merged[n] = base
    for n in layers:
        set_submodule(encoder.model, n, merged[n])
    try:
        return copy.deepcopy(encoder.model)
    finally:
        for n, layer in layers.items():
            set_submodule(encoder.model, n, layer)


# -- merged export -------------------------------------------------------------------------------------------
def export_merged(model: nn.Module, task: int | str, weights: Tensor | None = None) -> nn.Module:
    """A plain torch copy of ``model`` for one task, in eval mode: no MoLA layer, router or lift left.

    ``model`` is a MoLAModel (the result is its wrapped model with W0 + s*B_t A_t in every MoLA layer) or a MoLA
    architecture such as MoLANet (the result is ``TaskModel(merged backbone, head t)``, mapping x to task t's
    outputs). With ``weights`` (E,), W0 + s * sum_e w_e B_e A_e is folded in instead (and t only picks the head).
    ``model`` itself is left unchanged.
    """
    t = resolve_task(task, task_names(model))
    encoder, head = _mola_encoder_and_head(model, t, weights)
    backbone = encoder.merge(t) if weights is None else merge_mixture(encoder, weights)
    out = backbone if head is None else TaskModel(backbone, copy.deepcopy(head))
    leftover = [type(m).__name__ for m in out.modules() if isinstance(m, (MoLALayer, MoLAModel))]
    if leftover:
        raise RuntimeError(f"export_merged left MoLA modules in the plain model: {leftover}")
    return out.eval()


def reference_forward(model: nn.Module, x: Tensor, task: int | str, weights: Tensor | None = None) -> Tensor:
    """What ``model`` computes for task ``task`` on ``x`` with its MoLA routing forced to that task's adapter
    (grad mode: task ids t; router mode: mixing weights one-hot(t)) or to ``weights`` (E,) for every sample.
    The oracle ``export_merged`` must equal."""
    t = resolve_task(task, task_names(model))
    encoder, head = _mola_encoder_and_head(model, t, weights)
    n = x.shape[0]
    if weights is None and encoder.config.mode == "grad":
        feats = encoder(x, task_ids=torch.full((n,), t, dtype=torch.long, device=x.device))
    else:
        if weights is None:
            weights = torch.zeros(encoder.num_experts)
            weights[t] = 1
        feats = encoder(x, weights=weights.to(device=x.device, dtype=x.dtype).expand(n, -1).contiguous())
    if head is None:
        return feats
    return head(feats, (x.shape[-2], x.shape[-1]) if x.dim() == 4 else None)


def save_merged(module: nn.Module, example: Tensor, path: str | os.PathLike[str], fmt: str = "pt2") -> Path:
    """Save a plain module: ``pt2`` (torch.export, dynamic batch), ``torchscript`` (trace) or ``safetensors``.

    ``pt2`` loads with ``torch.export.load(path).module()`` and ``torchscript`` with ``torch.jit.load(path)``,
    neither needs mola; both fix every input dimension but the batch to ``example``'s. ``safetensors`` holds
    the state dict only (load it into the same module class).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {list(FORMATS)}")
    path = Path(path)
    module = module.eval()
    if fmt == "safetensors":
        return save_state(module, path, {"format": "mola-merged"})
    with torch.no_grad():
        if fmt == "pt2":
            batch = torch.export.Dim("batch")
            program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
            atomic_write(path, lambda tmp: torch.export.save(program, tmp))
        else:
            import warnings

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning)  # deprecated in recent torch, kept working
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                traced = torch.jit.trace(module, (example,))
                atomic_write(path, lambda tmp: torch.jit.save(traced, tmp))
    return path


# -- peft adapters -------------------------------------------------------------------------------------------
def base_model(model: nn.Module) -> nn.Module:
    """A plain copy of the backbone MoLA was injected into, with the original W0 (no adapter folded in).

    The module peft's adapters from ``export_peft`` attach to; its module names are the MoLA layer names.
    """
    encoder = single_mola_model(model)
    layers = encoder.mola_layers()
    for n, layer in layers.items():
        set_submodule(encoder.model, n, layer.base_layer)
    try:
        out = copy.deepcopy(encoder.model)
    finally:
        for n, layer in layers.items():
            set_submodule(encoder.model, n, layer)
    return out.eval()


def _peft_factors(name: str, layer: MoLALayer, t: int, weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """(lora_A.weight, lora_B.weight) in peft's shapes: expert t (rank r), or with ``weights`` the mixture
    sum_e w_e B_e A_e as one rank-E*r product [w_1 B_1 .. w_E B_E] [A_1; ..; A_E]. ValueError if peft's LoRA
    cannot express the layer."""
    e, r = layer.num_experts, layer.rank
    co, ci = layer.weight.shape[:2]
    if isinstance(layer, MoLAConv2d):
        conv = layer.base_layer
        kh, kw = conv.weight.shape[2:]
        problems = []
        if conv.groups != 1:
            problems.append(f"groups={conv.groups}")
        if tuple(conv.dilation) != (1, 1):
            problems.append(f"dilation={tuple(conv.dilation)} (peft's lora_A conv has no dilation)")
        if conv.padding_mode != "zeros":
            problems.append(f"padding_mode={conv.padding_mode!r} (peft's lora_A conv pads with zeros)")
        if layer.layout == "kernel" and (kh, kw) != (1, 1):
            problems.append(f"layout='kernel' with a {kh}x{kw} kernel (its update has rank up to r*k^2, not a LoRA "
                            "product; train with model.mola.layout=factorized)")
        if problems:
            raise ValueError(f"MoLA layer {name!r} cannot be written as a peft LoRA adapter: {', '.join(problems)}")
    # A is E blocks of r rows in every layout peft can hold (Linear, 1x1 kernel layout, factorized), B is (E, Co, r)
    a_all = layer.lora_A.reshape(e * r, -1)
    b_all = layer.lora_B.reshape(e, co, r)
    if weights is None:
        a, b = a_all[t * r:(t + 1) * r], b_all[t]
    else:
        a = a_all
        b = (b_all * weights.to(b_all).view(e, 1, 1)).permute(1, 0, 2).reshape(co, e * r)
    if isinstance(layer, MoLAConv2d):
        return a.reshape(a.shape[0], ci, *layer.weight.shape[2:]), b.reshape(co, b.shape[1], 1, 1)
    return a, b


def peft_adapter(model: nn.Module, task: int | str,
                 weights: Tensor | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(adapter_config dict, state dict with peft's key names) of task ``task``'s adapter, or (``weights`` (E,))
    of the adapter mixture sum_e w_e B_e A_e, written exactly as a LoRA of rank E*r with lora_alpha E*alpha."""
    t = resolve_task(task, task_names(model))
    encoder = single_mola_model(model)
    if weights is not None and tuple(weights.shape) != (encoder.num_experts,):
        raise ValueError(f"weights must have shape ({encoder.num_experts},), got {tuple(weights.shape)}")
    t2e = encoder.config.task_to_expert
    if weights is None and t2e is not None and t < len(t2e):
        t = t2e[t]  # the adapter task t shares with others
    if weights is None and t >= encoder.num_experts:
        raise ValueError(f"task {t} has no adapter of its own ({encoder.num_experts} adapters); pass weights")
    mult = 1 if weights is None else encoder.num_experts
    state: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    for name, layer in encoder.mola_layers().items():
        a, b = _peft_factors(name, layer, t, weights)
        state[f"base_model.model.{name}.lora_A.weight"] = a.detach().cpu().contiguous().clone()
        state[f"base_model.model.{name}.lora_B.weight"] = b.detach().cpu().contiguous().clone()
        ranks[name] = layer.rank * mult
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    names = list(ranks)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": common,
        "lora_alpha": encoder.config.alpha * mult,  # peft scales by lora_alpha / r, MoLA by alpha / r
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        # a regex fullmatched on module names: exactly the MoLA layers (a name list would also match suffixes)
        "target_modules": "(" + "|".join(re.escape(n) for n in names) + ")",
        "rank_pattern": {"^" + re.escape(n): r for n, r in ranks.items() if r != common},
        "alpha_pattern": {},
        "modules_to_save": None,
    }
    return config, state


def export_peft(model: nn.Module, task: int | str, out_dir: str | os.PathLike[str],
                weights: Tensor | None = None) -> Path:
    """Write task ``task``'s adapter (or the ``weights`` mixture, see ``peft_adapter``) as a peft LoRA adapter
    folder (``adapter_config.json`` + ``adapter_model.safetensors``) for ``base_model(model)``; returns the folder."""
    from safetensors.torch import save_file

    config, state = peft_adapter(model, task, weights)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / PEFT_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    atomic_write(out / PEFT_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return out


def save_state(module: nn.Module, path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> Path:
    """A module's state dict as one .safetensors file, atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    return path


__all__ = ["FORMATS", "FORMAT_FILES", "TaskModel", "base_model", "export_merged", "export_peft", "find_mola",
           "merge_mixture", "peft_adapter", "reference_forward", "resolve_task", "save_merged", "save_state",
           "single_mola_model", "task_names"]
