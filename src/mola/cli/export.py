"""``mola export``: one task of a trained MoLA run as a plain torch model (adapter merged), plus peft adapters.

Writes to ``--out``: the merged model (``model.pt2``, ``model.torchscript.pt`` or ``model.safetensors``) and
``export.json`` (task, format, how to load it, input preprocessing, the largest difference between the saved
model and the MoLA model on a few validation inputs). ``--peft`` adds ``peft/<task>/`` adapters for every task,
``peft/base_model.safetensors`` (the plain backbone) and ``peft/heads.safetensors``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

LOADERS = {
    "pt2": "torch.export.load('model.pt2').module()",
    "torchscript": "torch.jit.load('model.torchscript.pt')",
    "safetensors": "safetensors.torch.load_file('model.safetensors') into the same module (mola.export.TaskModel)",
}


def _examples(scenario: Any, task: int, n: int = 8) -> Tensor:
    """Up to ``n`` validation inputs of ``task`` (any val inputs for single-input data)."""
    ds = scenario.val
    ids = getattr(ds, "task_ids", None)
    rows = range(len(ds))
    if ids is not None and not scenario.heterogeneity == "single_input":
        rows = [i for i in range(len(ds)) if int(ids[i]) == task] or list(rows)
    picked = list(rows)[:n]
    if len(picked) < 2:
        return torch.randn(2, *scenario.input_shape)
    return torch.stack([ds[i][0] for i in picked])


def _reload(path: Path, fmt: str) -> Any:
    if fmt == "pt2":
        return torch.export.load(str(path)).module()
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return torch.jit.load(str(path))


def _router_mixing(model: Any, cfg: Any, scenario: Any, run: str) -> Any:
    """(T, E) mean router weights per task: stored with the task centroids, else computed on the train split."""
    import numpy as np

    from mola.analysis.routing import sample_loader
    from mola.engine.run import run_dir_of
    from mola.task_inference import MAX_SAMPLES, centroids_path, compute_centroids, load_run_centroids

    run_dir = run_dir_of(run)
    mw = load_run_centroids(run_dir).mean_weights if centroids_path(run_dir).is_file() else None
    if mw is None:
        loader = sample_loader(scenario.train, cfg.data.eval_batch_size, cfg.train.seed, MAX_SAMPLES)
        mw = compute_centroids(model, loader, [t.name for t in scenario.tasks]).mean_weights
    if np.isnan(mw).any():
        raise ValueError("some task has no training sample: no mean router weights to fold in (use --mixing expert)")
    return torch.from_numpy(mw)


def export_run(checkpoint: str, task: str, out: str, fmt: str = "pt2", peft: bool = False,
               mixing: str | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Export one task of a run; returns what ``export.json`` holds.

    ``mixing`` (router runs): ``task-mean`` (default) folds in the task's mean router weights over its training
    samples; ``expert`` folds in adapter t alone. MoLA-Grad runs always fold in adapter t."""
    from mola._version import __version__
    from mola.cli.predict import image_preprocessing
    from mola.engine.run import load_run
    from mola.export import (
        FORMAT_FILES,
        base_model,
        export_merged,
        export_peft,
        find_mola,
        peft_adapter,
        reference_forward,
        resolve_task,
        save_merged,
        save_state,
    )
    from mola.files import write_text

    run = load_run(checkpoint, "best", overrides=overrides)
    cfg, scenario, model = run.cfg, run.scenario, run.model
    if cfg.model.arch != "mola":
        raise ValueError(f"mola export needs a MoLA run (model.arch=mola), this run is arch {cfg.model.arch!r}")
    names = [t.name for t in scenario.tasks]
    t = resolve_task(task, names)
    router = cfg.model.mola.mode == "router"
    if not router and mixing not in (None, "expert"):
        raise ValueError("--mixing applies to MoLA-Router runs; a MoLA-Grad run folds in the task's own adapter")
    mixing = mixing or ("task-mean" if router else "expert")
    encoder = find_mola(model)
    if mixing == "expert" and encoder.num_experts != len(names) and encoder.config.task_to_expert is None:
        raise ValueError(f"--mixing expert folds in adapter t as task t's, but this router run has "
                         f"{encoder.num_experts} adapters for {len(names)} tasks (adapter t is not task t's); use "
                         "--mixing task-mean (the default: the task's mean router weights)")
    mw = _router_mixing(model, cfg, scenario, checkpoint) if mixing == "task-mean" else None
    if peft:
        peft_adapter(model, t, None if mw is None else mw[t])  # fail before writing when a layer has no LoRA form
    out_dir = Path(out)
    merged = export_merged(model, t, None if mw is None else mw[t])
    x = _examples(scenario, t)
    with torch.no_grad():
        ref = reference_forward(model, x, t, None if mw is None else mw[t])
        path = save_merged(merged, x[:2], out_dir / FORMAT_FILES[fmt], fmt)
        saved = merged if fmt == "safetensors" else _reload(path, fmt)
        got = saved(x)
        err = float((got - ref).abs().max())
        if router:  # the router's own per-input mixture, which the export approximates
            own = model(x, torch.full((x.shape[0],), t, dtype=torch.long))[t]
            vs_router = {"max_abs_error": float((got - own).abs().max()),
                         "argmax_agreement": float((got.argmax(1) == own.argmax(1)).float().mean())}
    try:
        prep = image_preprocessing(scenario).to_dict()
    except ValueError:
        prep = None
    info: dict[str, Any] = {
        "format": fmt, "file": path.name, "load": LOADERS[fmt], "task": names[t], "task_index": t, "tasks": names,
        "mode": cfg.model.mola.mode, "input_shape": list(scenario.input_shape), "dynamic": "batch dimension",
        "output": f"task {names[t]!r} head outputs (logits for classification)",
        "mixing": {"kind": mixing, "weights": None if mw is None else [float(v) for v in mw[t]],
                   "meaning": "task's mean router weights over its training samples folded in" if mw is not None
                   else "the task's adapter folded in"},
        "max_abs_error_vs_mola": err, "preprocessing": prep,
        "checkpoint": str(run.path), "mola_version": __version__,
    }
    if router:
        info["vs_router_model"] = {**vs_router, "inputs": f"{x.shape[0]} validation inputs of the task"}
    if peft:
        peft_dir = out_dir / "peft"
        for k, name in enumerate(names):
            export_peft(model, k, peft_dir / name, None if mw is None else mw[k])
        save_state(base_model(model), peft_dir / "base_model.safetensors")
        save_state(model.heads, peft_dir / "heads.safetensors")
        info["peft"] = {"dir": "peft", "adapters": names, "base_model": "base_model.safetensors",
                        "heads": "heads.safetensors (head k under prefix 'k.'"
                                 + (", one shared head" if model.shared_head else "") + ")"}
    write_text(json.dumps(info, indent=2), out_dir / "export.json")
    return info


def cmd_export(args: argparse.Namespace) -> int:
    from mola.cli.checks import check_writable_dir

    check_writable_dir(Path(args.out), "--out")
    info = export_run(args.checkpoint, args.task, args.out, args.format, args.peft, args.mixing, args.overrides)
    print(f"exported task {info['task']!r} ({info['format']}) to {Path(args.out) / info['file']}; largest "
          f"difference to the MoLA model on validation inputs {info['max_abs_error_vs_mola']:.2e}")
    if "peft" in info:
        print(f"peft adapters for {', '.join(info['peft']['adapters'])} in {Path(args.out) / 'peft'}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``mola export``."""
    from mola.export import FORMATS

    p = subparsers.add_parser(
        "export", help="one task of a MoLA run as a plain torch model (adapter merged) and peft adapters",
        description="Fold task T's adapter into the backbone, drop router and lift, and save the plain model "
                    "with its head (docs/deployment.md).")
    p.add_argument("--checkpoint", required=True, help="run directory (its best checkpoint) or checkpoint file")
    p.add_argument("--task", required=True, help="task name or index")
    p.add_argument("--format", choices=list(FORMATS), default="pt2",
                   help="pt2 (torch.export, default), torchscript (torch.jit.trace) or safetensors (state dict)")
    p.add_argument("--peft", action="store_true",
                   help="also write a peft LoRA adapter per task (factorized layout or 1x1 convs/Linear only)")
    p.add_argument("--mixing", choices=["task-mean", "expert"],
                   help="router runs: fold in the task's mean router weights (task-mean, default) or adapter T alone")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("overrides", nargs="*", metavar="data.root=PATH",
                   help="where the run's data is now, if it moved since training")
    p.set_defaults(func=cmd_export)
