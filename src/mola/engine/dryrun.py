"""``mola train --dry-run``: build everything a run needs (data spec, model, method, optimizer) and train nothing.

Layouts that declare their shape (``mola.data.synthetic.SPECS``: the paper presets, nyuv2, radimagenet) are
built on a synthetic stand-in, so a paper config can be checked without its dataset; other layouts read and split
their data as a real run would. A run directory that already holds a run is an error unless ``resume``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mola.data.synthetic import scenario_spec, synthetic_scenario
from mola.engine.config import RunConfig


def dry_run(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Build the Trainer of ``cfg`` (nothing is written) and summarise what it built."""
    import copy
    import warnings

    from mola.engine.selection import selection_label
    from mola.engine.setup import validate_names
    from mola.engine.single_task import run_has_checkpoint
    from mola.engine.trainer import Trainer
    from mola.models import num_parameters
    from mola.models.weights import named_weights_status

    validate_names(cfg)
    resumable = run_has_checkpoint(Path(run_dir))
    if resumable and not resume:
        raise ValueError(f"run directory {run_dir} already holds a run; pass --resume to continue it "
                         "or --out DIR for a new one")
    weights = named_weights_status(cfg.model.backbone)
    cfg = copy.deepcopy(cfg)
    cfg.data.num_workers = 0  # no batch is loaded
    if weights is not None:  # named weights are resolved and their cache checked, not loaded or downloaded
        cfg.model.backbone.weights = None
    separate = cfg.model.arch == "single_task"
    if separate:  # one run per task in `mola train`; the same T networks built together here
        cfg.model.arch = "single_task_joint"
    spec = scenario_spec(cfg.data)
    root = Path(cfg.data.root).expanduser()
    if spec is None and not root.exists():
        raise FileNotFoundError(f"data folder {str(root)!r} (data.root) does not exist; set data.root=PATH")
    scenario = synthetic_scenario(spec, seed=cfg.train.seed) if spec is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the select_on warning: the summary says it
        trainer = Trainer(cfg, run_dir, scenario=scenario)
    sc = trainer.scenario
    opt = trainer.optimizer
    return {
        "name": cfg.name,
        "run_dir": f"{run_dir} ({'resume' if resume and resumable else 'new'})",
        "data": f"synthetic stand-in of {cfg.data.kind} (no data read)" if spec is not None
        else f"{cfg.data.kind} at {cfg.data.root}",
        "heterogeneity": sc.heterogeneity,
        "tasks": {t.name: t.num_classes if t.kind == "classification" else t.kind for t in sc.tasks},
        "input_shape": list(sc.input_shape),
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
    }


def format_dry_run(summary: dict[str, Any]) -> str:
    """The dry-run summary as ``key: value`` lines."""
    return "\n".join(f"{k}: {v}" for k, v in summary.items())
