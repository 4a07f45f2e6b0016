"""Spectra of plain (non-MoLA) weights and side-by-side comparisons of runs (docs/results.md: "compare with a model
trained without MoLA", Fig. 4's "higher-rank model").

A MoLA layer is matched to a layer of another model by its module path: the MoLA layer ``layer4.conv1`` matches
``encoder.layer4.conv1`` in an HPS model (the longest path that ends with it), or the MoLA layer of the same name
in another MoLA model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mola.analysis.spectra import adapter_weights, pc_stats, singular_values
from mola.inject import find_mola_model
from mola.layers import MoLALayer

_PLAIN = (nn.Conv2d, nn.Linear)


def plain_weights(model: nn.Module, skip_prefixes: tuple[str, ...] = ("heads",)) -> dict[str, Tensor]:
    """Every Conv2d/Linear weight of ``model`` by module path (MoLA layers give their shared W0), heads skipped."""
    out: dict[str, Tensor] = {}
    inside_mola: set[str] = set()
    for name, mod in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in skip_prefixes):
            continue
        if any(name.startswith(m + ".") for m in inside_mola):
            continue
        if isinstance(mod, MoLALayer):
            inside_mola.add(name)
            out[name] = mod.weight.detach()
        elif isinstance(mod, _PLAIN):
            out[name] = mod.weight.detach()
    return out


@torch.no_grad()
def plain_layer_spectra(model: nn.Module, eps: float = 0.99) -> list[dict[str, Any]]:
    """One row per Conv2d/Linear weight outside the heads: shape, numerical rank, k* and pc proportion."""
    rows = []
    for name, w in plain_weights(model).items():
        st = pc_stats(w, eps)
        rows.append({"layer": name, "shape": "x".join(str(d) for d in w.shape), "eps": eps,
                     "w_rank": st["rank"], "w_kstar": st["kstar"], "w_pc": st["proportion"]})
    return rows


def match_layer(name: str, candidates: list[str]) -> str | None:
    """The candidate path equal to ``name`` or ending with ``.name`` (shortest such path); None if none does."""
    hits = [c for c in candidates if c == name or c.endswith("." + name)]
    return min(hits, key=len) if hits else None


def _ref_matrices(ref: nn.Module, name: str, expert: int) -> dict[str, Tensor]:
    """The weights of ``ref`` matching MoLA layer ``name``: W0 and W0 + s*dW_expert for MoLA, W for plain."""
    enc = find_mola_model(ref)
    if enc is not None:
        layers = enc.mola_layers()
        if name in layers:
            pairs = adapter_weights(layers[name])
            return {"W0": layers[name].weight.detach(), f"W0+s*dW{expert}": pairs[min(expert, len(pairs) - 1)][1]}
    weights = plain_weights(ref)
    hit = match_layer(name, list(weights))
    return {"W": weights[hit]} if hit is not None else {}


@torch.no_grad()
def compare_spectra(model: nn.Module, refs: dict[str, nn.Module], eps: float = 0.99,
                    experts: tuple[int, ...] = (0, 1)) -> tuple[list[dict[str, Any]], dict[str, dict[str, Tensor]]]:
    """Per MoLA layer of ``model``: pc proportions of W0, W0+s*dW_e and of the matching weights of each reference.

    Returns (rows for a CSV, {layer: {label: nonzero singular values}} for ``plots.plot_singular_values``)."""
    enc = find_mola_model(model)
    if enc is None:
        raise ValueError(f"{type(model).__name__} has no MoLA layers; compare_spectra needs a MoLA model first")
    if not refs:
        raise ValueError("compare_spectra needs at least one reference model")
    rows: list[dict[str, Any]] = []
    svals: dict[str, dict[str, Tensor]] = {}
    for name, layer in enc.mola_layers().items():
        mats: dict[str, Tensor] = {"W0": layer.weight.detach()}
        pairs = adapter_weights(layer)
        for e in experts:
            if e < len(pairs):
                mats[f"W0+s*dW{e}"] = pairs[e][1]
        for label, ref in refs.items():
            for k, w in _ref_matrices(ref, name, experts[0] if experts else 0).items():
                if w.shape != layer.weight.shape:
                    raise ValueError(f"layer {name}: reference {label!r} has weight shape {tuple(w.shape)}, this "
                                     f"model {tuple(layer.weight.shape)}; compare runs of the same backbone")
                mats[f"{label}:{k}"] = w
        row: dict[str, Any] = {"layer": name, "eps": eps}
        svals[name] = {}
        for k, w in mats.items():
            s = singular_values(w)
            st = pc_stats(w, eps)
            row[f"{k} pc"] = st["proportion"]
            row[f"{k} rank"] = st["rank"]
            svals[name][k] = s[: max(1, st["rank"])]
        rows.append(row)
    return rows, svals


__all__ = ["compare_spectra", "match_layer", "plain_layer_spectra", "plain_weights"]
