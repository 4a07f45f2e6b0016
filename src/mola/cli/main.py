"""``mola`` entry point: train, eval, list. Errors in the user's input print one line and exit 2; a NaN/inf
loss that stops training (train.on_nonfinite=stop) prints one line and exits 3."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mola._version import __version__


def _run_dir(cfg, out: str | None) -> Path:
    return Path(out) if out else Path(cfg.out_dir) / cfg.name


def cmd_train(args: argparse.Namespace) -> int:
    from mola.engine import Trainer, format_table, load_config

    cfg = load_config(args.config, args.overrides, arch=args.arch, weighting=args.weighting, method=args.method)
    if args.seed is not None:
        cfg.train.seed = args.seed
    run_dir = _run_dir(cfg, args.out)
    from mola.engine.single_task import fit_single_task, run_has_checkpoint

    if args.dry_run:
        return _dry_run(cfg, run_dir, args.resume)

    resumable = run_has_checkpoint(run_dir)
    if resumable and not args.resume:
        raise ValueError(f"run directory {run_dir} already holds a run; pass --resume to continue it "
                         "or --out DIR for a new one")
    if cfg.model.arch == "single_task":  # the paper's protocol: one separate run per task
        final = fit_single_task(cfg, run_dir, resume=args.resume)
        split = "test" if final["test"] else "val"
        print(f"\n{cfg.name}: {split} metrics, each task from its own run's best-on-val checkpoint, run dir {run_dir}")
        print(format_table(final, split))
        return 0
    trainer = Trainer(cfg, run_dir)  # under torchrun: one rank of a DDP run (docs/distributed.md)
    main = trainer.dist.is_main
    if args.resume and resumable:
        path = trainer.resume()
        if main:
            print(f"resuming {run_dir} from {path.name} at epoch {trainer.epoch}, batch {trainer.batch_in_epoch} "
                  f"(step {trainer.step})", file=sys.stderr)
    final = trainer.fit()
    from mola.task_inference import write_trained_centroids  # MoLA-Router: task centroids of z, for `mola predict`

    write_trained_centroids(trainer)
    if main:
        split = "test" if final["test"] else "val"
        print(f"\n{cfg.name}: {split} metrics of the best-on-val checkpoint (epoch {final['best_epoch']}), "
              f"run dir {run_dir}")
        print(format_table(final, split))
    return 0


def _dry_run(cfg: Any, run_dir: Path, resume: bool) -> int:
    """Check a run config without training (names, the data: read and split as training would) and print what
    would be trained."""
    from mola.data import build_scenario
    from mola.engine.setup import validate_names
    from mola.engine.single_task import run_has_checkpoint as has_checkpoint

    validate_names(cfg)
    root = Path(cfg.data.root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data folder {str(root)!r} (data.root) does not exist; set data.root=PATH")
    scenario = build_scenario(cfg.data)
    state = "resume" if resume and has_checkpoint(run_dir) else "new"
    if has_checkpoint(run_dir) and not resume:
        raise ValueError(f"run directory {run_dir} already holds a run; pass --resume to continue it "
                         "or --out DIR for a new one")
    arch = cfg.model.arch + (f" ({cfg.model.mola.mode})" if cfg.model.arch == "mola" else "")
    sizes = "/".join(str(len(getattr(scenario, s))) for s in ("train", "val", "test"))
    print(f"would train ({state}) {cfg.name}: {scenario.name}, {scenario.num_tasks} tasks "
          f"({', '.join(t.name for t in scenario.tasks)}), {sizes} train/val/test samples at {root}; arch {arch}, "
          f"weighting {cfg.train.weighting}, method {cfg.train.method}, {cfg.train.epochs} epochs -> {run_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mola.data.loaders import make_eval_loader
    from mola.engine import evaluate, format_table, load_run
    from mola.engine.setup import resolve_device

    device = resolve_device(args.device)
    run = load_run(args.checkpoint, args.which, device, overrides=args.overrides)
    splits = ["val", "test"] if args.split == "both" else [args.split]
    out = {s: evaluate(run.model, make_eval_loader(getattr(run.scenario, s), run.cfg.data), run.scenario.tasks,
                       device, progress=True, desc=s) for s in splits}
    print(f"{run.path} (epoch {run.state.get('epoch', 0) - 1}):")
    for s in splits:
        print(f"{s}:")
        print(format_table({s: out[s], "val": out[s]}, s))
    if args.output:
        from mola.files import write_text

        write_text(json.dumps(out, indent=2), args.output)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    import mola.data.layouts  # noqa: F401
    import mola.methods  # noqa: F401
    import mola.models.archs  # noqa: F401
    from mola.data.registry import SCENARIOS
    from mola.engine.config import SHORTHANDS
    from mola.methods import DOMAIN_METHODS, WEIGHTINGS
    from mola.models import ARCHS, BACKBONES

    configs = sorted(p.stem for p in Path("configs").glob("*.yaml")) if Path("configs").is_dir() else []
    rows = [
        ("data kinds (data.kind)", SCENARIOS.names()),
        ("scenario configs (configs/)", configs),
        ("archs (--arch)", ARCHS.names()),
        ("weightings (--weighting)", WEIGHTINGS.names()),
        ("methods (--method)", sorted(SHORTHANDS) + ["erm"] + [n for n in DOMAIN_METHODS.names() if n != "erm"]),
        ("backbones (model.backbone.name)", BACKBONES.names() + ["timm:<name>"]),
    ]
    for title, names in rows:
        print(f"{title}:\n  " + ", ".join(names))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mola", description="Mixture of Low-rank Adapters on heterogeneous data")
    p.add_argument("--version", action="version", version=f"mola {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one run from a YAML config and dotted.key=value overrides")
    t.add_argument("--config", "-c", help="YAML run config")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.epochs=5")
    t.add_argument("--arch", help="shorthand for model.arch")
    t.add_argument("--weighting", help="shorthand for train.weighting")
    t.add_argument("--method", help="mola_grad | mola_router | erm | a domain method (train.method)")
    t.add_argument("--seed", type=int, help="shorthand for train.seed")
    t.add_argument("--out", help="run directory (default: out_dir/name)")
    t.add_argument("--resume", action="store_true", help="continue the run in the run directory")
    t.add_argument("--dry-run", action="store_true",
                   help="check the config (names, data folder) and print what would be trained; train nothing")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="evaluate a checkpoint file or a run directory's best checkpoint",
                       description="Rebuild the run's model and data from its stored config and report the metrics "
                                   "of each task on val and/or test (no training, nothing written unless --output).")
    e.add_argument("--checkpoint", required=True, help="run directory (its --which checkpoint) or checkpoint file")
    e.add_argument("--which", choices=["best", "last"], default="best",
                   help="checkpoint of a run directory: best on val (default) or last")
    e.add_argument("--split", choices=["val", "test", "both"], default="both", help="split(s) to evaluate")
    e.add_argument("--output", help="also write the metrics as JSON to this file")
    e.add_argument("--device", default="cpu", help="device to evaluate on: cpu (default), cuda, auto, ...")
    e.add_argument("overrides", nargs="*", metavar="data.root=PATH",
                   help="where the data is now, if it moved since training (also data.eval_batch_size, "
                        "data.num_workers)")
    e.set_defaults(func=cmd_eval)
    ls = sub.add_parser("list", help="scenarios, archs, weightings, methods and backbones")
    ls.set_defaults(func=cmd_list)
    from mola.cli import analyze, export, predict, report, sweep
    for mod in (analyze, sweep, report, export, predict):
        mod.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"mola: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from mola.engine.trainer import NonFiniteLossError

        if not isinstance(err, NonFiniteLossError):
            raise
        print(f"mola: error: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
