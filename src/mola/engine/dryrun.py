"""``mola train --dry-run``: build everything a run needs (data, model, method, optimizer) and train nothing.

Every data kind reads and splits its real data as a run would (a missing folder is a FileNotFoundError naming
it) and the summary shows what was found: samples per task, class and split, channels, image sizes and what is
resized. ``synthetic=True`` (``--dry-run --synthetic``) builds layouts that declare their shape
(``mola.data.synthetic.SPECS``: the paper presets, nyuv2, radimagenet) on a random stand-in instead, so a paper
config can be checked without its dataset. Nothing is written and the run folder is not locked; its state
(new, resumable, holding results) is reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mola.data.synthetic import scenario_spec, synthetic_scenario
from mola.engine.config import RunConfig


def _run_dir_state(run_dir: Path, resume: bool) -> str:
    from mola.engine.single_task import run_has_checkpoint

    if run_has_checkpoint(run_dir):
        return "resume" if resume else "holds a run: training needs --resume to continue it or --out DIR"
    if (run_dir / "final.json").exists() or (run_dir / "metrics.csv").exists():
        return "holds results: training needs --overwrite or --out DIR"
    return "new"


def _task_lines(sc: Any) -> dict[str, str]:
    """Per task: classes (names when the layout knows them), samples per split and per class."""
    import numpy as np

    names = sc.extra.get("classes") if isinstance(sc.extra, dict) else None
    out = {}
    for t, task in enumerate(sc.tasks):
        parts = []
        if task.kind == "classification":
            cls = names.get(task.name) if isinstance(names, dict) else names if isinstance(names, list) else None
            shown = f" ({', '.join(map(str, cls[:8]))}{', ...' if len(cls) > 8 else ''})" if cls else ""
            parts.append(f"{task.num_classes} classes{shown}")
        else:
            parts.append(task.kind)
        for split in ("train", "val", "test"):
            ds = getattr(sc, split)
            if sc.heterogeneity == "single_input":
                parts.append(f"{split} {len(ds)}")
                continue
            mine = np.asarray(ds.task_ids) == t
            text = f"{split} {int(mine.sum())}"
            labels = getattr(ds, "labels", None)
            if labels is not None and task.kind == "classification" and mine.any():
                per = np.bincount(np.asarray(labels)[mine], minlength=task.num_classes or 0)
                text += f" [{'/'.join(str(int(c)) for c in per[:12])}{'/...' if len(per) > 12 else ''}]"
            parts.append(text)
        out[task.name] = ", ".join(parts)
    return out


def dry_run(cfg: RunConfig, run_dir: str | Path, resume: bool = False, synthetic: bool = False) -> dict[str, Any]:
    """Build the Trainer of ``cfg`` on its real data (``synthetic``: on a declared-shape stand-in), write
    nothing, take no lock, and summarise what it built."""
    import copy
    import warnings

    from mola.engine.selection import selection_label
    from mola.engine.setup import validate_names
    from mola.engine.trainer import Trainer
    from mola.models import num_parameters
    from mola.models.weights import named_weights_status

    validate_names(cfg)
    state = _run_dir_state(Path(run_dir), resume)
    weights = named_weights_status(cfg.model.backbone)
    cfg = copy.deepcopy(cfg)
    cfg.data.num_workers = 0  # no batch is loaded
    if weights is not None:  # named weights are resolved and their cache checked, not loaded or downloaded
        cfg.model.backbone.weights = None
    separate = cfg.model.arch == "single_task"
    if separate:  # one run per task in `mola train`; the same T networks built together here
        cfg.model.arch = "single_task_joint"
    spec = scenario_spec(cfg.data) if synthetic else None
    if synthetic and spec is None:
        raise ValueError(f"--synthetic: data.kind {cfg.data.kind} declares no shape to build a stand-in from; "
                         "drop --synthetic (the dry run then reads the data)")
    scenario = synthetic_scenario(spec, seed=cfg.train.seed) if spec is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the select_on warning: the summary says it
        trainer = Trainer(cfg, run_dir, scenario=scenario)
    sc = trainer.scenario
    opt = trainer.optimizer
    return {
        "name": cfg.name,
        "run_dir": f"{run_dir} ({state})",
        "data": f"synthetic stand-in of {cfg.data.kind} (no data read)" if spec is not None
        else f"{cfg.data.kind} at {cfg.data.root}",
        "heterogeneity": sc.heterogeneity + (" (one shared head)" if sc.shared_head else ""),
        "tasks": {t.name: t.num_classes if t.kind == "classification" else t.kind for t in sc.tasks},
        "per_task": _task_lines(sc) if spec is None else None,
        "input_shape": list(sc.input_shape),
        "data_notes": sc.notes if spec is None else None,
        "train_size": spec.train_size if spec is not None else len(sc.train),
        "arch": "single_task (one run per task; built here as single_task_joint)" if separate else cfg.model.arch,
        "mode": cfg.model.mola.mode if cfg.model.arch == "mola" else None,
        "backbone": cfg.model.backbone.name,
        "weights": weights or cfg.model.backbone.weights,
        "head": cfg.model.head,
        "parameters": num_parameters(trainer.model),
        "optimizer": f"{type(opt).__name__} lr {opt.param_groups[0]['lr']:g} wd {opt.param_groups[0]['weight_decay']:g}"
        + (f", {type(trainer.scheduler).__name__}" if trainer.scheduler is not None else ""),
        "weighting": cfg.train.weighting,
        "method": cfg.train.method,
        "epochs": cfg.train.epochs,
        "batch_size": cfg.data.batch_size,
        "selection": selection_label(cfg),
        "untuned": untuned_note(cfg, sc.heterogeneity, opt.param_groups[0]["lr"]),
    }


def untuned_note(cfg: RunConfig, heterogeneity: str, lr: float) -> str | None:
    """Which defaults a config inherits that docs/results.md found unstable, or None: multi-input runs that set
    neither optim.lr (SGD 0.05) nor model.mola.alpha (16)."""
    from mola.inject import MoLAConfig

    if heterogeneity != "multi_input" or cfg.optim.lr is not None:
        return None
    alpha = cfg.model.arch == "mola" and cfg.model.mola.alpha == MoLAConfig().alpha
    also = " and neither is model.mola.alpha (16)" if alpha else ""
    return (f"optim.lr is not set (the scenario default, lr {lr:g}){also}: docs/results.md found these "
            "defaults unstable between seeds on the shipped data; the shipped configs use optim.lr=0.02 and "
            "model.mola.alpha=4")


def format_dry_run(summary: dict[str, Any]) -> str:
    """The dry-run summary as ``key: value`` lines (per-task details indented below ``per_task``)."""
    lines = []
    for k, v in summary.items():
        if v is None and k in ("per_task", "data_notes", "untuned"):
            continue
        if k == "per_task":
            lines.append("per_task: samples per split [per class]")
            lines += [f"  {name}: {text}" for name, text in v.items()]
        else:
            lines.append(f"{k}: {v}")
    return "\n".join(lines)
