"""``inject`` (peft-style in-place wrapping) and MoLAModel: the wrapped model, its routing, save and load."""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import Tensor, nn

from mola.files import atomic_write, tensors_sha256
from mola.inject.config import ADAPTER_WARN_FACTOR, MAX_ADAPTER_GB, MoLAConfig, adapter_budget
from mola.inject.targets import find_stage_groups, rank_for, resolve_targets
from mola.layers import Lift, MLPRouter, MoLAConv2d, MoLALayer, MoLALinear, Router, Routing, twd_loss
from mola.layers.routing import check_task_ids

_M = TypeVar("_M", bound=nn.Module)


class MoLAModel(nn.Module):
    """A model whose targeted layers carry MoLA adapters, plus (router mode) the shared router and lift.

    ``forward(x, task_ids=None, weights=None, *args, **kwargs)`` sets the routing once, then calls the wrapped
    model and returns its output unchanged.
    """

    def __init__(self, model: nn.Module, config: MoLAConfig, layers: dict[str, MoLALayer],
                 router: nn.Module | None, lift: nn.Module | None,
                 router_groups: dict[str, list[str]] | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.layer_names = list(layers)
        self.router = router  # one router, or an nn.ModuleList of one per group (router_sharing != shared)
        self.lift = lift  # likewise: one lift per router
        t2e = config.task_to_expert
        self.task_to_expert_map: Tensor
        self.register_buffer("task_to_expert_map", torch.tensor(t2e if t2e is not None else [], dtype=torch.long),
                             persistent=False)
        groups = router_groups or {"shared": list(layers)}
        self.router_names = list(groups)
        self.routings = [Routing(config.num_experts) for _ in groups]
        self.routing = self.routings[0]
        for routing, names in zip(self.routings, groups.values(), strict=True):
            for n in names:
                layers[n].routing = routing

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def router_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(router, lift) of each router group, in ``router_names`` order; empty in grad mode."""
        if self.router is None or self.lift is None:
            return []
        if isinstance(self.router, nn.ModuleList):
            return list(zip(self.router, cast(nn.ModuleList, self.lift), strict=True))
        return [(self.router, self.lift)]

    def routing_weights(self) -> Tensor:
        """(B, E) mixing weights of the last forward: the mean over routers (one router: its weights)."""
        ws = [r.weights for r in self.routings]
        if any(w is None for w in ws):
            raise ValueError("no mixing weights: call the model in router mode (or with weights=) first")
        return ws[0] if len(ws) == 1 else torch.stack(ws).mean(0)  # type: ignore[arg-type,return-value]

    def routing_code(self) -> Tensor:
        """(B, d) code z of the last forward for task inference; with several routers the concatenation of
        their L2-normalised codes (R*d), so every router counts equally."""
        zs = [r.z for r in self.routings]
        if any(z is None for z in zs):
            raise ValueError("no router codes: call the model in router mode first")
        if len(zs) == 1:
            return zs[0]  # type: ignore[return-value]
        return torch.cat([torch.nn.functional.normalize(z, dim=1) for z in zs], dim=1)  # type: ignore[arg-type]

    def mola_layers(self) -> dict[str, MoLALayer]:
        return {n: self.model.get_submodule(n) for n in self.layer_names}  # type: ignore[misc]

    # -- routing --------------------------------------------------------------------------------------
    def _check_task_ids(self, task_ids: Any, batch: int, bounded: bool) -> Tensor:
        t2e = self.config.task_to_expert
        top = (len(t2e) if t2e is not None else self.num_experts) if bounded else None
        what = f" (task_to_expert has {top} tasks)" if t2e is not None and bounded else \
            f" (num_experts={self.num_experts})"
        return check_task_ids(task_ids, batch, 0, top, what).long()

    def set_routing(self, x: Any, task_ids: Tensor | None = None, weights: Tensor | None = None,
                    groups: tuple[Tensor, list[int]] | None = None, checked: bool = False) -> None:
        """Fill the shared routing state for input ``x`` (what ``forward`` does before calling the model).

        ``checked``: the caller (``MoLANet``) already validated ``task_ids``; ``groups``: ``task_groups(task_ids,
        E)`` it already computed. Each saves work per forward (and a host sync on CPU)."""
        if not isinstance(x, Tensor):
            raise ValueError("MoLAModel expects the first input to be a batch tensor")
        batch = x.shape[0]
        grad = self.config.mode == "grad"
        if task_ids is not None and not checked:
            task_ids = self._check_task_ids(task_ids, batch, bounded=grad).to(x.device)
        if weights is not None:
            if not isinstance(weights, Tensor) or weights.shape != (batch, self.num_experts):
                shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
                raise ValueError(f"weights must have shape ({batch}, {self.num_experts}), got {shape}")
            if not weights.dtype.is_floating_point:
                raise ValueError(f"weights must be a floating tensor, got {weights.dtype}")
            for routing in self.routings:
                routing.set_weights(weights, task_ids)
            return
        if grad:
            if task_ids is None:
                raise ValueError("MoLA-Grad needs task_ids: call model(x, task_ids=...) with a (B,) int tensor")
            if self.config.task_to_expert is not None:
                task_ids = self.task_to_expert_map.to(task_ids.device)[task_ids]  # several tasks, one adapter
                groups = None  # the caller grouped the task ids, not the adapters
            self.routing.set_task_ids(task_ids, groups)
            return
        assert self.router is not None and self.lift is not None
        for (router, lift), routing in zip(self.router_pairs(), self.routings, strict=True):
            logits = router(x)
            # softmax in at least float32 (half logits are upcast; float64 must not be downcast)
            w = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
            w = w.to(logits.dtype)
            routing.set_weights(w, task_ids)
            routing.logits = logits
            routing.z = lift(logits if self.config.lift_input == "logits" else w)

    def forward(self, x: Any, *args: Any, task_ids: Tensor | None = None, weights: Tensor | None = None,
                groups: tuple[Tensor, list[int]] | None = None, checked: bool = False, **kwargs: Any) -> Any:
        self.set_routing(x, task_ids, weights, groups, checked)
        return self.model(x, *args, **kwargs)

    def twd_loss(self, gather: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """TwD loss of the last forward's codes and task ids (router mode; several routers: the mean of their
        losses); ``gather`` (an autograd-aware all-gather of rows, under DDP) makes it the loss of every
        process's codes together."""
        r = self.routing
        if r.z is None:
            raise ValueError("twd_loss needs router codes: use mode='router' and let the router route")
        if r.task_ids is None:
            raise ValueError("twd_loss needs task ids: pass task_ids to forward in router mode")
        task_ids = gather(r.task_ids) if gather is not None else r.task_ids
        losses = []
        for routing in self.routings:  # every router's code gets its own TwD term; the loss is their mean
            assert routing.z is not None
            z = gather(routing.z) if gather is not None else routing.z
            losses.append(twd_loss(z, task_ids, self.config.twd_tau))
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    # -- parameters -----------------------------------------------------------------------------------
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        out = {}
        for name, layer in self.mola_layers().items():
            for pn, p in layer.named_parameters(recurse=False):
                out[f"model.{name}.{pn}"] = p
        return out

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts by part: backbone (incl. anything else inside the wrapped model), adapters, router, lift."""
        adapters = sum(p.numel() for p in self.adapter_parameters().values())
        router = sum(p.numel() for p in self.router.parameters()) if self.router is not None else 0
        lift = sum(p.numel() for p in self.lift.parameters()) if self.lift is not None else 0
        backbone = sum(p.numel() for p in self.model.parameters()) - adapters
        return {"backbone": backbone, "adapters": adapters, "router": router, "lift": lift,
                "total": backbone + adapters + router + lift}

    def freeze_backbone(self) -> None:
        """Train only the adapters, router and lift: every other weight of the wrapped model gets
        ``requires_grad=False`` (peft's default for LoRA; MoLA trains all by default, as the paper)."""
        mine = {id(p) for p in self.adapter_parameters().values()}
        for p in self.model.parameters():
            if id(p) not in mine:
                p.requires_grad_(False)

    def print_trainable_parameters(self) -> None:
        """Print trainable and total parameter counts (peft's method of the same name)."""
        print(trainable_parameters_line(self))

    # -- save / load ----------------------------------------------------------------------------------
    def _adapter_state(self) -> dict[str, Tensor]:
        state = {k: v.detach() for k, v in self.adapter_parameters().items()}
        for part in ("router", "lift"):
            mod = getattr(self, part)
            if mod is not None:
                state.update({f"{part}.{k}": v.detach() for k, v in mod.state_dict().items()})
        return state

    def _meta_config(self) -> dict[str, Any]:
        d = self.config.to_dict()
        d.pop("compute")
        return d

    def save_adapters(self, path: str | os.PathLike[str]) -> None:
        """Write adapters, router and lift tensors + the config (metadata) to one .safetensors file, atomically."""
        from safetensors.torch import save_file

        from mola._version import __version__

        tensors = {k: v.cpu().contiguous().clone() for k, v in self._adapter_state().items()}
        config = json.dumps(self._meta_config())
        meta = {"format": "mola-adapters", "mola_version": __version__, "config": config,
                "sha256": tensors_sha256(config, tensors)}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def load_adapters(self, path: str | os.PathLike[str]) -> None:
        """Load a file written by ``save_adapters``; another config, missing or extra tensors are ValueErrors."""
        path = Path(path)
        saved, tensors = _read_adapter_file(path)
        mine = json.loads(json.dumps(self._meta_config()))
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if diff:
            detail = ", ".join(f"{k}: file={saved.get(k)!r} model={mine.get(k)!r}" for k in diff)
            raise ValueError(f"adapter file {path} was saved with another MoLA config ({detail})")
        own = self._adapter_state()
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or extra:
            raise ValueError(f"adapter file {path} does not fit this model: missing {missing[:5]}, extra {extra[:5]}")
        for k, t in tensors.items():
            if k.endswith(".lora_A") and t.dim() == 5 and t.numel() == own[k].numel() and own[k].dim() == 4:
                tensors[k] = t = t.reshape(own[k].shape)  # legacy 5-D factorized lora_A (E, r, Ci, kh, kw)
            if t.shape != own[k].shape:
                raise ValueError(
                    f"adapter file {path}: {k} has shape {tuple(t.shape)}, model has {tuple(own[k].shape)}"
                )
        with torch.no_grad():
            for k, t in tensors.items():
                own[k].copy_(t)

    # -- deployment -----------------------------------------------------------------------------------
    def merge(self, task_id: int) -> nn.Module:
        """A plain copy of the wrapped model with W0 + s*dW_t folded in (t: the task's adapter under
        ``task_to_expert``); this MoLA model is left unchanged."""
        if isinstance(task_id, bool) or not isinstance(task_id, (int, np.integer)):
            raise ValueError(f"task id must be an int, got {type(task_id).__name__}")
        task_id = int(task_id)
        t2e = self.config.task_to_expert
        top = len(t2e) if t2e is not None else self.num_experts
        if not 0 <= task_id < top:
            raise ValueError(f"task id {task_id!r} out of range [0, {top})")
        if t2e is not None:
            task_id = t2e[task_id]  # the adapter this task shares
        layers = self.mola_layers()
        merged: dict[str, nn.Module] = {}
        with torch.no_grad():
            for n, layer in layers.items():
                base = copy.deepcopy(layer.base_layer)
                base.weight.copy_(layer.merged_weight(task_id))
                merged[n] = base
        # Deep-copy the model with MoLA layers temporarily swapped for their merged plain layers.
        for n in layers:
            set_submodule(self.model, n, merged[n])
        try:
            out = copy.deepcopy(self.model)
        finally:
            for n, layer in layers.items():
                set_submodule(self.model, n, layer)
        return out


def _read_adapter_file(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The saved MoLA config and the tensors of a file written by ``MoLAModel.save_adapters``; a missing, corrupt
    or foreign file, a checksum mismatch or a config that is not a JSON object is an error naming the file."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"corrupt or unreadable adapter file {path}: {err}") from err
    if meta.get("format") != "mola-adapters" or "config" not in meta:
        raise ValueError(f"{path} is not a mola adapter file (no mola metadata)")
    if "sha256" not in meta:
        warnings.warn(f"adapter file {path} has no checksum (written by an older mola); its content cannot be "
                      "verified", RuntimeWarning, stacklevel=3)
    elif tensors_sha256(meta["config"], tensors) != meta["sha256"]:
        raise ValueError(f"corrupt adapter file {path}: the sha256 of its content does not match the one "
                         "recorded when it was written")
    try:
        saved = json.loads(meta["config"])
    except json.JSONDecodeError as err:
        raise ValueError(f"adapter file {path}: its 'config' metadata is not valid JSON ({err}); re-export the "
                         "adapters with save_adapters") from err
    if not isinstance(saved, dict):
        raise ValueError(f"adapter file {path}: its 'config' metadata must be a JSON object, got "
                         f"{type(saved).__name__}; re-export the adapters with save_adapters")
    return saved, tensors


def trainable_parameters_line(model: nn.Module) -> str:
    """``trainable params: N || all params: M || trainable%: P``, peft's format."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    share = 100 * trainable / max(total, 1)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}"


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _first(model: nn.Module, kind: type[_M]) -> _M | None:
    return next((m for m in model.modules() if isinstance(m, kind)), None)


def build_router(model: nn.Module, config: MoLAConfig) -> nn.Module:
    """The shared router for ``model``: residual net on images, MLP on feature inputs (docs/concepts.md)."""
    kind = config.router_type
    conv = _first(model, nn.Conv2d)
    if kind == "auto":
        kind = "resnet" if (conv is not None or config.router_in_channels) else "mlp"
    if kind == "resnet":
        cin = config.router_in_channels or (conv.in_channels if conv is not None else None)
        if cin is None:
            raise ValueError("router_type='resnet' needs router_in_channels: the model has no Conv2d to read it from")
        w = config.router_width
        return Router(cin, config.num_experts, widths=(w, 2 * w, 4 * w), blocks=config.router_blocks,
                      input_size=config.router_input_size, stem_stride=config.router_stem_stride)
    lin = _first(model, nn.Linear)
    fin = config.router_in_channels or (lin.in_features if lin is not None else None)
    if fin is None:
        raise ValueError("router_type='mlp' needs router_in_channels (the flattened input size)")
    return MLPRouter(fin, config.num_experts)


def find_mola_model(model: nn.Module) -> MoLAModel | None:
    """The MoLAModel inside ``model`` (itself, e.g. ``MoLANet.encoder``, or under a DDP ``module``), or None."""
    if isinstance(model, MoLAModel):
        return model
    return next((m for m in model.modules() if isinstance(m, MoLAModel)), None)


def router_groups(model: nn.Module, names: list[str], sharing: str) -> dict[str, list[str]]:
    """{router name: the MoLA layers it routes}: one group for all layers ("shared"), one per backbone stage
    holding MoLA layers ("per_stage", stages as the target presets see them) or one per layer ("per_layer")."""
    if sharing == "shared":
        return {"shared": list(names)}
    if sharing == "per_layer":
        return {n: [n] for n in names}
    if sharing != "per_stage":
        raise ValueError(f"router_sharing={sharing!r}; expected one of ['shared', 'per_stage', 'per_layer']")
    try:
        stages, _ = find_stage_groups(model)
    except ValueError as err:
        raise ValueError(f"router_sharing='per_stage' needs the model's stages: {err}") from err
    prefixes = [g[0] for g in stages]
    groups: dict[str, list[str]] = {}
    for n in names:
        stage = next((g[0] for g in stages if any(n == p or n.startswith(p + ".") for p in g)), None)
        if stage is None:
            raise ValueError(f"router_sharing='per_stage': MoLA layer {n!r} is in no backbone stage {prefixes}; "
                             "use router_sharing 'shared' or 'per_layer'")
        groups.setdefault(stage, []).append(n)
    return groups


def inject(model: nn.Module, config: MoLAConfig, *, max_adapter_gb: float | None = MAX_ADAPTER_GB) -> MoLAModel:
    """Replace the targeted Conv2d/Linear modules of ``model`` in place with MoLA layers; return the MoLAModel.

    The adapters' size is estimated first: above ``max_adapter_gb`` (None: no limit) it is a ValueError, and
    adapters much larger than the model get a warning."""
    if not isinstance(config, MoLAConfig):
        raise ValueError(f"inject expects a MoLAConfig, got {type(config).__name__}")
    if config.num_experts < 1:
        raise ValueError(f"MoLAConfig.num_experts={config.num_experts}: inject needs the number of adapters E "
                         "(usually the number of tasks), e.g. MoLAConfig(num_experts=3); 0, the default, means "
                         "'one per task' only in a run config, where mola knows the tasks")
    if any(isinstance(m, MoLALayer) for m in model.modules()):
        raise ValueError("model already contains MoLA layers; inject into the original model once")
    names = resolve_targets(model, config.target_modules)
    n_adapter = adapter_budget(model, names, config)
    p0 = next(model.parameters(), None)
    gb = n_adapter * (p0.element_size() if p0 is not None else 4) / 1e9
    if max_adapter_gb is not None and gb > max_adapter_gb:
        raise ValueError(f"MoLA adapters would need {gb:.1f} GB ({n_adapter:,} parameters for num_experts="
                         f"{config.num_experts}, rank={config.rank} on {len(names)} layer(s)), above the limit "
                         f"max_adapter_gb={max_adapter_gb:g}; lower num_experts/rank, or pass "
                         "inject(..., max_adapter_gb=None) to lift the limit")
    n_model = sum(p.numel() for p in model.parameters())
    if n_model and n_adapter > ADAPTER_WARN_FACTOR * n_model:
        warnings.warn(f"MoLA adapters hold {n_adapter:,} parameters, {n_adapter / n_model:.0f}x the "
                      f"{n_model:,} of the model they adapt (num_experts={config.num_experts}, rank={config.rank}): "
                      "check rank and num_experts", RuntimeWarning, stacklevel=2)
    layers: dict[str, MoLALayer] = {}
    for n in names:
        base = model.get_submodule(n)
        kw: dict[str, Any] = dict(num_experts=config.num_experts, rank=rank_for(n, config.rank), alpha=config.alpha,
                                  layout=config.layout, compute=config.compute, name=n)
        # resolve_targets yields Conv2d/Linear modules only (MoLALinear re-checks its base's type).
        layer: MoLALayer = (MoLAConv2d(base, **kw) if isinstance(base, nn.Conv2d)
                            else MoLALinear(cast(nn.Linear, base), **kw))
        set_submodule(model, n, layer)
        layers[n] = layer
    router: nn.Module | None = None
    lift: nn.Module | None = None
    groups = None
    if config.mode == "router":
        groups = router_groups(model, names, config.router_sharing)
        pairs = [(build_router(model, config), Lift(config.num_experts, config.lift_dim, config.lift_hidden))
                 for _ in groups]
        if config.router_sharing == "shared":
            router, lift = pairs[0]
        else:
            router, lift = nn.ModuleList(r for r, _ in pairs), nn.ModuleList(lf for _, lf in pairs)
        p = next((q for q in model.parameters() if q.is_floating_point()), None)
        if p is not None:  # router and lift follow the model's device and dtype (a float64 model stays float64)
            router.to(device=p.device, dtype=p.dtype)
            lift.to(device=p.device, dtype=p.dtype)
    return MoLAModel(model, config, layers, router, lift, groups)
