"""``mola`` entry point: train, eval, list. Errors in the user's input print one line and exit 2; a NaN/inf
loss that stops training (train.on_nonfinite=stop) prints one line and exits 3."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from mola._version import __version__
from mola.cli.checks import check_writable_dir, check_writable_file


def _run_dir(cfg, out: str | None) -> Path:
    return Path(out) if out else Path(cfg.out_dir) / cfg.name


RESULT_FILES = ("config.yaml", "metrics.csv", "final.json", "task_centroids.json")
"""Files of a run folder that ``mola train --out`` never silently overwrites."""

RUN_WRITES = (*RESULT_FILES, "checkpoints", "tb", "tasks", "analysis", "report", "sweep.json", "train.log",
              "curves.png", "conflict")
"""Everything ``mola train`` (and ``analyze`` / ``report`` / ``sweep`` / ``conflict`` with their default outputs)
writes into a run folder: what ``--overwrite`` removes, so nothing of the old run is left to be mistaken for the
new one's."""

_interrupted_hint: list[str] = []  # what a Ctrl-C should tell (set by commands that write resumable state)
_command_line: list[str] = []  # the arguments of this `mola` call, for a pasteable resume hint


def cmd_train(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from mola.engine import load_config
    from mola.engine.checkpoint import RunLock

    cfg = load_config(args.config, args.overrides, arch=args.arch, weighting=args.weighting, method=args.method)
    if args.seed is not None:
        cfg.train.seed = args.seed
    if args.device is not None:
        cfg.train.device = args.device
    shorthands = [v for v in (args.method, args.arch, args.weighting) if v]
    if shorthands and not any(o.split("=", 1)[0].strip() == "name" for o in args.overrides or []):
        cfg.name = "-".join([cfg.name, *shorthands])  # a router/HPS run of a config gets its own name and folder
    run_dir = _run_dir(cfg, args.out)
    if args.synthetic and not args.dry_run:
        raise ValueError("--synthetic builds a stand-in of the data for --dry-run only; add --dry-run")
    if args.dry_run:  # reads the data, writes nothing, takes no lock: --out may hold a run
        from mola.engine.dryrun import dry_run, format_dry_run

        print(format_dry_run(dry_run(cfg, run_dir, resume=args.resume, synthetic=args.synthetic)))
        return 0
    check_writable_dir(run_dir, "run directory (--out)")
    from mola.engine.single_task import run_has_checkpoint

    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 owns (and writes) the run folder
    with RunLock(run_dir) if rank0 else nullcontext():
        resumable = run_has_checkpoint(run_dir)
        if resumable and not args.resume:
            raise ValueError(f"run directory {run_dir} already holds a run; pass --resume to continue it "
                             "or --out DIR for a new one")
        results = [n for n in RESULT_FILES if (run_dir / n).exists()]
        no_results = results == ["config.yaml"]  # a run stopped before its first checkpoint: nothing to lose
        if results and not resumable and not args.overwrite and not no_results:
            raise ValueError(f"run directory {run_dir} holds {', '.join(results)} but no checkpoint to resume "
                             "from; pass --overwrite to replace them, or --out DIR for a new run")
        if results and not resumable and args.overwrite and not no_results:
            _clear_run_folder(run_dir)
        _interrupted_hint[:] = [str(run_dir)]
        return _train(cfg, run_dir, args, resumable)


def _clear_run_folder(run_dir: Path) -> None:
    """``--overwrite``: remove every file and folder the old run wrote (``RUN_WRITES``) and say what went; files
    mola does not write are left and named."""
    import shutil

    removed = []
    for name in RUN_WRITES:
        path = run_dir / name
        folder = path.is_dir() and not path.is_symlink()
        if folder:
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name + ("/" if folder else ""))
    from mola.engine.checkpoint import LOCK_NAME

    others = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_WRITES and p.name != LOCK_NAME)
    print(f"--overwrite: removed the old run's {', '.join(removed)} from {run_dir}"
          + (f"; left alone (not written by mola): {', '.join(others)}" if others else ""), file=sys.stderr)


def _train(cfg: Any, run_dir: Path, args: argparse.Namespace, resumable: bool) -> int:
    from mola.engine import Trainer, format_table
    from mola.engine.single_task import fit_single_task

    if cfg.model.arch == "single_task":  # the paper's protocol: one separate run per task
        final = fit_single_task(cfg, run_dir, resume=args.resume)
        split = "test" if final["test"] else "val"
        print(f"\n{cfg.name}: {split} metrics, each task from its own run's best checkpoint (selected on "
              f"{final['selection']['note']}), run dir {run_dir}")
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
        print(f"\n{cfg.name}: {split} metrics of the best checkpoint (epoch {final['best_epoch']}; selected on "
              f"{final['selection']['note']}), run dir {run_dir}")
        print(format_table(final, split))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mola.data.loaders import make_eval_loader
    from mola.engine import evaluate, format_table, load_run
    from mola.engine.setup import resolve_device

    if args.output:
        check_writable_file(Path(args.output), "--output")
    device = resolve_device(args.device, "--device")
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
    from mola.engine.config import SHORTHANDS, config_folders
    from mola.methods import DOMAIN_METHODS, WEIGHTINGS
    from mola.models import ARCHS, BACKBONES

    configs = sorted({str(p.relative_to(d.parent if d.name == "paper" else d).with_suffix(""))
                      for d in config_folders() for p in d.glob("*.yaml")})
    rows = [
        ("data kinds (data.kind)", SCENARIOS.names()),
        ("configs (--config NAME)", configs),
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
    t.add_argument("--config", "-c", help="YAML run config: a path, or a shipped config's name (`mola list`)")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.epochs=5 (anywhere on the "
                                                "line)")
    t.add_argument("--arch", help="shorthand for model.arch")
    t.add_argument("--weighting", help="shorthand for train.weighting")
    t.add_argument("--method", help="mola_grad | mola_router | erm | a domain method (train.method)")
    t.add_argument("--seed", type=int, help="shorthand for train.seed")
    t.add_argument("--out", help="run directory (default: out_dir/name)")
    t.add_argument("--device", help="shorthand for train.device: auto, cpu, cuda, cuda:1, mps")
    t.add_argument("--resume", action="store_true", help="continue the run in the run directory")
    t.add_argument("--overwrite", action="store_true",
                   help="train into a run directory that holds results (config.yaml, metrics.csv, final.json) "
                        "but no checkpoint: first remove everything the old run wrote there (also tb/, analysis/, "
                        "report/, task_centroids.json) and say what went")
    t.add_argument("--dry-run", action="store_true",
                   help="check the config and read the data (samples per task, class and split, channels, image "
                        "sizes), build model, method and optimizer, print a summary; train, write and lock nothing")
    t.add_argument("--synthetic", action="store_true",
                   help="with --dry-run: build layouts that declare their shape (paper presets, nyuv2, "
                        "radimagenet) on a random stand-in, so a config is checked without its data")
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
    from mola.cli import analyze, conflict, export, layers, predict, report, sweep
    for mod in (analyze, conflict, sweep, report, export, predict, layers):
        mod.add_parser(sub)
    return p


INTERRUPT_HINTS = {
    "sweep": "run the same `mola sweep` command again: finished runs are skipped, interrupted ones resume from "
             "their last checkpoint",
    "eval": "nothing was written", "predict": "nothing was written", "conflict": "no complete output was written",
}


def _train_hint(run_dir: Path) -> str:
    """What a Ctrl-C in ``mola train`` tells: the newest checkpoint on disk and the command that continues."""
    from mola.engine.checkpoint import checkpoint_path
    from mola.engine.single_task import run_has_checkpoint

    last = checkpoint_path(run_dir, "last")
    if not run_has_checkpoint(run_dir):
        return f"no checkpoint written yet in {run_dir}; rerun the same command to start again"
    where = f"last checkpoint: {last}" if last.is_file() else f"checkpoints of the per-task runs in {run_dir / 'tasks'}"
    return f"{where}; continue with: {resume_command(_command_line, run_dir)}"


def resume_command(argv: list[str], run_dir: Path) -> str:
    """The command that continues an interrupted ``mola train``: the same arguments, ``--out RUN_DIR`` and
    ``--resume`` (shell-quoted, pasteable)."""
    import shlex

    args = list(argv)
    if "--out" in args[:-1]:
        i = args.index("--out")
        del args[i:i + 2]
    args = [a for a in args if a not in ("--resume", "--overwrite")]
    return shlex.join(["mola", *args, "--out", str(run_dir), "--resume"])


def _one_line(err: BaseException) -> str:
    """The message of a user error; one raised in a DataLoader worker carries the worker's traceback, of which
    only the last line (the original error) is kept."""
    msg = str(err)
    if "Original Traceback" in msg:
        lines = [ln for ln in msg.splitlines() if ln.strip()]
        msg = lines[-1].split(": ", 1)[-1] if lines else msg
    return msg


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; ``dotted.key=value`` overrides may stand anywhere (also after an option's value)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if extra and (stray or not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one command. User errors print one line (no traceback): exit 2 for bad input, 3 for a run stopped by
    a non-finite loss/metric, 1 for an OS error (disk full, permissions), 130 for Ctrl-C."""
    args = parse_args(argv)
    _command_line[:] = list(sys.argv[1:] if argv is None else argv)
    from mola.engine.checkpoint import RunLockedError
    from mola.engine.selection import NonFiniteError

    _interrupted_hint[:] = []
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        hint = _train_hint(Path(_interrupted_hint[0])) if _interrupted_hint else INTERRUPT_HINTS.get(args.command, "")
        print(f"mola: interrupted (Ctrl-C){'; ' + hint if hint else ''}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RunLockedError) as err:
        print(f"mola: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except NonFiniteError as err:  # a loss, the weights or a validation metric
        print(f"mola: error: {_one_line(err)}", file=sys.stderr)
        return 3
    except OSError as err:  # disk full, read-only folder, ...: the message names the path
        print(f"mola: error: {_one_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
