"""``mola conflict``: how much the tasks' gradients conflict on the shared weights, at init or of a trained run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def cmd_conflict(args: argparse.Namespace) -> int:
    import torch

    from mola.analysis.conflict import write_conflict
    from mola.cli.checks import check_writable_dir
    from mola.data import build_scenario
    from mola.engine import load_config, load_run
    from mola.engine.conflict import model_conflict
    from mola.engine.setup import resolve_device, seed_everything
    from mola.models import build_model

    if args.batches < 1:
        raise ValueError(f"--batches must be >= 1, got {args.batches}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    device = resolve_device(args.device, "--device")
    if args.checkpoint:
        run = load_run(args.checkpoint, args.which, device, overrides=args.overrides)
        cfg, scenario, model = run.cfg, run.scenario, run.model
        weights = f"{args.which} checkpoint {run.path} (epoch {run.state.get('epoch', 0)})"
        out = Path(args.out) if args.out else run.run_dir / "conflict"
    else:
        if not args.config:
            raise ValueError("mola conflict needs --config CFG (weights at init) or --checkpoint RUN (trained)")
        cfg = load_config(args.config, args.overrides, arch=args.arch, weighting=None, method=args.method)
        if cfg.model.arch == "single_task":
            raise ValueError("arch single_task shares no weights between tasks: nothing can conflict; measure "
                             "the HPS or MoLA version of the config (--arch hps)")
        seed_everything(cfg.train.seed)
        scenario = build_scenario(cfg.data)
        seed_everything(cfg.train.seed)  # as the Trainer: the same initial weights as `mola train` draws
        model = build_model(scenario, cfg.model).to(device)
        weights = f"init (seed {cfg.train.seed})"
        out = Path(args.out) if args.out else Path(cfg.out_dir) / f"{cfg.name}-conflict"
    check_writable_dir(out, "output folder (--out)")
    batch_size = args.batch_size or cfg.data.batch_size
    print(f"measuring conflict: {scenario.num_tasks} tasks, {args.batches} batches of {batch_size} rows, "
          f"{weights}", file=sys.stderr)
    result = model_conflict(model, scenario, args.batches, batch_size, args.seed, cfg.model.mola.target_modules,
                            device, progress=True)
    meta: dict[str, Any] = {"name": cfg.name, "weights": weights, "arch": cfg.model.arch,
                            "mode": cfg.model.mola.mode if cfg.model.arch == "mola" else None,
                            "batches": args.batches, "batch_size": batch_size, "seed": args.seed,
                            "heterogeneity": scenario.heterogeneity, "torch": torch.__version__}
    _, summary = write_conflict(result, out, meta, plots=not args.no_plots)
    print(summary)
    if scenario.heterogeneity != "domain" and not args.checkpoint:
        print("note: at init each task has its own random head, so backbone cosines sit near 0 by construction; "
              "measure a checkpoint (--checkpoint RUN) after an epoch or more to see the data's conflict")
    print(f"wrote {out / 'conflict.csv'}, summary.txt and {len(result.levels())} heatmaps")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``mola conflict``."""
    p = subparsers.add_parser(
        "conflict", help="task-gradient conflict on the shared weights (per layer, stage and overall)",
        description="For K training batches, take each task's loss gradient on the shared weights W0 and report, "
                    "per task pair and per level (each MoLA target layer, each backbone stage, ALL), the cosine "
                    "of the mean gradients with a bootstrap interval over batches, the share of batches with a "
                    "negative cosine and the gradient-norm ratio. Writes conflict.csv, summary.txt, "
                    "conflict.json and one heatmap per level.")
    p.add_argument("--config", "-c", help="YAML run config (weights at init, seeded by train.seed)")
    p.add_argument("--checkpoint", help="a run directory (its --which checkpoint) or checkpoint file: trained weights")
    p.add_argument("--which", choices=["best", "last"], default="best", help="checkpoint of a run directory")
    p.add_argument("--batches", "-k", type=int, default=8, help="K, batches per task (default 8)")
    p.add_argument("--batch-size", type=int, help="rows per batch, all tasks together (default data.batch_size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch draw and of dropout (default 0)")
    p.add_argument("--arch", help="shorthand for model.arch (with --config)")
    p.add_argument("--method", help="mola_grad | mola_router | ... (with --config)")
    p.add_argument("--out", help="output folder (default RUN/conflict, or out_dir/<name>-conflict)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, auto, ...")
    p.add_argument("--no-plots", action="store_true", help="write no heatmaps")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides (with --checkpoint: data.root=PATH)")
    p.set_defaults(func=cmd_conflict)
