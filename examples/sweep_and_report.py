"""A sweep (methods x seeds) and its report table, through the ``mola sweep`` and ``mola report`` commands.

The script writes the synthetic shapes dataset of ``custom_folder_dataset.py`` (``folder`` layout), a base
run config and a sweep file, then runs

    mola sweep --config OUT/sweep.yaml --no-progress
    mola report OUT/runs --out OUT/report

which train single-task, HPS, MoLA-Grad and MoLA-Router over ``--seeds`` seeds and tabulate test accuracy
per domain (mean +/- std over seeds) with Delta_m against the single-task row. Running it again skips the
runs that have finished (the sweep is resumable).

    python examples/sweep_and_report.py                              # 3 seeds, 6 epochs
    python examples/sweep_and_report.py --seeds 2 --epochs 1 --images-per-class 4 --image-size 16   # smoke

Writes ``OUT/data/``, ``OUT/base.yaml``, ``OUT/sweep.yaml``, ``OUT/runs/<variant>-s<seed>/`` and
``OUT/report/{report.md,report.csv,report.png}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from mola.cli.main import main as mola_cli

sys.path.insert(0, str(Path(__file__).resolve().parent))
from custom_folder_dataset import DOMAINS, write_folder_dataset  # noqa: E402

VARIANTS = ["single_task", "hps", "mola_grad", "mola_router"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/example_sweep"))
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    p.add_argument("--images-per-class", type=int, default=30)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--width", type=int, default=8, help="small_cnn width")
    p.add_argument("--workers", type=int, default=1, help="parallel `mola train` processes")
    args = p.parse_args(argv)

    data = write_folder_dataset(args.out / "data", args.images_per_class, args.image_size)
    base = {
        "name": "shapes",
        "data": {"kind": "folder", "root": str(data), "domains": list(DOMAINS), "image_size": args.image_size,
                 "val_fraction": 0.2, "test_fraction": 0.2, "batch_size": 32},
        "model": {"arch": "mola", "backbone": {"name": "small_cnn", "width": args.width}},
        "train": {"epochs": args.epochs, "progress": False, "tensorboard": False},
        "optim": {"name": "adam", "lr": 3e-3},
    }
    (args.out / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    choices = {
        "single_task": "model.arch=single_task",
        "hps": "model.arch=hps",
        "mola_grad": ["model.arch=mola", "model.mola.mode=grad"],
        "mola_router": ["model.arch=mola", "model.mola.mode=router"],
    }
    sweep = {
        "base": str(args.out / "base.yaml"),
        "out_dir": str(args.out / "runs"),
        "grid": {"seed": list(range(args.seeds))},
        "overrides": {"variant": [{v: choices[v]} for v in args.variants]},
    }
    (args.out / "sweep.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    print(f"$ mola sweep --config {args.out / 'sweep.yaml'} --no-progress")
    rc = mola_cli(["sweep", "--config", str(args.out / "sweep.yaml"), "--workers", str(args.workers),
                   "--no-progress"])
    if rc:
        return rc
    print(f"$ mola report {args.out / 'runs'} --out {args.out / 'report'}")
    return mola_cli(["report", str(args.out / "runs"), "--out", str(args.out / "report")])


if __name__ == "__main__":
    raise SystemExit(main())
