"""Initial weights of a backbone (``model.backbone.weights``): a local state-dict file, or a torchvision weight
name (``IMAGENET1K_V1``, ``DEFAULT``, ``ResNet18_Weights.IMAGENET1K_V1``) loaded through torch hub's cache, or
timm's ``pretrained``. The source classifier is dropped and a 3-channel input layer adapted to other channel
counts (1 channel: the sum of the RGB filters, as timm does)."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from torchvision.models._api import WeightsEnum


class WeightsSpec(Protocol):
    """What weight loading reads of a backbone config (``BackboneConfig`` has these fields)."""

    name: str
    weights: str | None
    strict: bool


_SKIP_PREFIXES = ("fc.", "head.", "heads.")
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".tar")


def adapt_input_conv(weight: Tensor, in_channels: int) -> Tensor:
    """A (Co, 3, kh, kw) input-layer weight for ``in_channels`` inputs: 1 channel sums the RGB filters (a gray
    image replicated to RGB gives the same output); others tile the filters and rescale by 3 / C (timm's rule)."""
    c = weight.shape[1]
    if c == in_channels:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_channels // c)
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (c / in_channels)


def _input_conv_key(own: dict[str, Tensor]) -> str | None:
    return next((k for k, v in own.items() if v.dim() == 4), None)


def fit_state_dict(model: nn.Module, state: dict[str, Tensor], where: str,
                   skip_prefixes: tuple[str, ...] = _SKIP_PREFIXES, strict: bool = True) -> list[str]:
    """Load the tensors of ``state`` that fit ``model`` (classifier keys skipped; the input layer adapted to the
    model's channel count); returns the loaded keys. ``strict``: missing, unexpected or mis-shaped keys (e.g.
    ResNet-50 weights for a ResNet-18) are a ValueError listing them; otherwise the fitting tensors load and the
    rest is named in a warning."""
    own = model.state_dict()
    first = _input_conv_key(own)
    keep, shapes = {}, []
    for k, v in state.items():
        if k not in own or k.startswith(skip_prefixes):
            continue
        if v.shape == own[k].shape:
            keep[k] = v
        elif (k == first and v.dim() == 4 and v.shape[0] == own[k].shape[0]
              and v.shape[2:] == own[k].shape[2:]):
            keep[k] = adapt_input_conv(v, own[k].shape[1])
        else:
            shapes.append(f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}")
    if not keep:
        raise ValueError(f"backbone weights {where} share no tensor with {type(model).__name__}")
    missing = [k for k in own if k not in state and not k.startswith(skip_prefixes)
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not k.startswith(skip_prefixes)]
    if missing or unexpected or shapes:
        parts = "; ".join(f"{name} ({len(keys)}): {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
                          for name, keys in (("missing", missing), ("unexpected", unexpected),
                                             ("shape mismatch", shapes)) if keys)
        msg = (f"backbone weights {where} do not fit {type(model).__name__} ({len(keep)} of {len(own)} tensors "
               f"fit); {parts}")
        if strict:
            raise ValueError(f"{msg}. Is the file for another architecture? Set model.backbone.strict: false to "
                             "load only the fitting tensors")
        warnings.warn(f"{msg}; loading the {len(keep)} fitting tensors (model.backbone.strict: false)",
                      RuntimeWarning, stacklevel=2)
    model.load_state_dict(keep, strict=False)
    return list(keep)


def _read_state_file(p: Path) -> dict[str, Tensor]:
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ValueError(f"cannot read backbone weights {p}: {err}") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"backbone weights {p} are not a state dict of tensors")
    return state


def load_local_weights(model: nn.Module, path: str, skip_prefixes: tuple[str, ...] = _SKIP_PREFIXES,
                       strict: bool = True) -> None:
    """Load a local state dict (weights_only), ignoring classifier keys; the input layer is adapted."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {p}")
    fit_state_dict(model, _read_state_file(p), str(p), skip_prefixes, strict)


def is_weight_name(weights: str) -> bool:
    """True when ``weights`` reads as a library weight name (``IMAGENET1K_V1``, ``X_Weights.DEFAULT``,
    ``pretrained``) rather than a file path."""
    return (re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?", weights) is not None
            and not weights.lower().endswith(_FILE_SUFFIXES) and not Path(weights).exists())


def torchvision_weights(model_name: str, name: str) -> WeightsEnum:
    """The torchvision weight enum member ``name`` (``DEFAULT``, ``IMAGENET1K_V1`` or ``Enum.MEMBER``)."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(model_name)
    member = name.split(".", 1)[1] if name.startswith(enum.__name__ + ".") else name
    try:
        return cast("WeightsEnum", enum[member])
    except KeyError:
        accepted = ["DEFAULT", *(m.name for m in enum), f"{enum.__name__}.<NAME>"]
        raise ValueError(f"unknown weights {name!r} for backbone {model_name!r} (and no such file); accepted "
                         f"names: {', '.join(accepted)}, or a local state-dict file") from None


def weight_cache_file(weights: WeightsEnum) -> Path:
    """Where torch hub keeps (and looks for) the file of ``weights``: ``$TORCH_HOME/hub/checkpoints/<url name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def load_named_weights(model_name: str, name: str) -> dict[str, Tensor]:
    """The state dict of torchvision weights ``name`` through torch hub's cache (downloaded only when absent and
    a network is there); an absent file offline is a FileNotFoundError saying where to place it."""
    weights = torchvision_weights(model_name, name)
    path = weight_cache_file(weights)
    try:
        return cast("dict[str, Tensor]", torch.hub.load_state_dict_from_url(
            weights.url, progress=False, map_location="cpu", weights_only=True))
    except Exception as err:  # noqa: BLE001 - URLError/HTTPError offline, unpickling errors for a bad file
        if path.is_file():
            raise ValueError(f"cannot read cached weights {path} ({weights}): {err}") from err
        reason = str(getattr(err, "reason", err)).splitlines()[0] if str(err) else type(err).__name__
        raise FileNotFoundError(
            f"pretrained weights {weights} for {model_name}: file {path.name} is not in the torch hub cache "
            f"{path.parent} and could not be downloaded ({reason}); download {weights.url} on a machine with "
            f"network and copy it to {path} (TORCH_HOME sets the cache root), or set model.backbone.weights "
            "to a local state-dict file") from None


TORCHVISION_BACKBONES = {"resnet18": "resnet18", "resnet50": "resnet50", "shufflenet_v2_x1_0": "shufflenet_v2_x1_0",
                         "vit_b_16": "vit_b_16"}
"""mola backbone name -> torchvision model name (whose weight enum ``model.backbone.weights`` names)."""


def named_weights_status(cfg: WeightsSpec) -> str | None:
    """For ``weights`` given by name: what they resolve to and whether the file is cached (nothing is loaded or
    downloaded; unknown names are errors); None for no weights or a local file."""
    if not cfg.weights or not is_weight_name(cfg.weights):
        return None
    if cfg.name.startswith("timm:"):
        if cfg.weights != "pretrained":
            raise ValueError(f"backbone {cfg.name!r}: weights {cfg.weights!r} is neither `pretrained` nor a file")
        from huggingface_hub import constants

        return f"timm {cfg.name[5:]} pretrained (Hugging Face cache {constants.HF_HUB_CACHE})"
    tv = TORCHVISION_BACKBONES.get(cfg.name)
    if tv is None:
        raise ValueError(f"backbone {cfg.name!r} has no pretrained weights named {cfg.weights!r} (and no such file)")
    weights = torchvision_weights(tv, cfg.weights)
    path = weight_cache_file(weights)
    return f"{weights} ({path}: {'cached' if path.is_file() else 'not cached, downloaded on first use'})"


def load_weights(model: nn.Module, cfg: WeightsSpec, torchvision_name: str | None,
                 prepare: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None) -> None:
    """Initialise ``model`` from ``cfg.weights`` (local file or, for torchvision backbones, a weight name)."""
    if not cfg.weights:
        return
    if not is_weight_name(cfg.weights):
        p = Path(cfg.weights)
        if not p.is_file():
            raise FileNotFoundError(f"backbone weights file not found: {p}")
        state, where = _read_state_file(p), str(p)
    elif torchvision_name is None:
        hint = " (timm backbones take `pretrained`)" if cfg.name.startswith("timm:") else ""
        raise ValueError(f"backbone {cfg.name!r} has no pretrained weights named {cfg.weights!r} (and no such file)"
                         f"{hint}; give a local state-dict file")
    else:
        state, where = load_named_weights(torchvision_name, cfg.weights), f"{torchvision_name} {cfg.weights}"
    fit_state_dict(model, prepare(state) if prepare is not None else state, where, strict=cfg.strict)
