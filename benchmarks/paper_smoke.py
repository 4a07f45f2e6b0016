"""GPU smoke check of the paper configs: build every ``configs/paper/*.yaml`` on synthetic tensors of the paper's
shapes, run training steps of each through the real Trainer step, and print step time, peak memory, images/s and
the estimated hours per run and per table (docs/paper.md).

Each config runs as configured (its arch, MoLA mode, optimizer, batch size, input shape), with random weights
instead of named pretrained ones (same cost, nothing downloaded), bf16 autocast and channels_last on CUDA.
The timed steps follow ``--warmup`` untimed ones. Hours = steps per epoch (train images / batch) x epochs x step
time: training only (no evaluation, no data loading), so a floor. Table hours = the sweep's rows x seeds x the
mean hours of the benchmark's MoLA-Grad and MoLA-Router runs (``--rows`` times every sweep row instead; the
single-task row as ``single_task_joint``: the same T networks and images per epoch as its T separate runs).

  python benchmarks/paper_smoke.py --device cuda                   # the table of docs/paper.md
  python benchmarks/paper_smoke.py --device cuda --rows            # also time every row of every paper sweep
  python benchmarks/paper_smoke.py --device cpu --tiny             # CI: 32 px, batch 2/task, 1 step, every config
"""

from __future__ import annotations

import argparse
import copy
import glob
import math
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mola.data.synthetic import ScenarioSpec, scenario_spec, synthetic_batch, synthetic_scenario
from mola.engine import load_config
from mola.engine.config import RunConfig
from mola.engine.trainer import Trainer
from mola.models.weights import is_weight_name

ROOT = Path(__file__).resolve().parent.parent


class DeviceBatches:
    """A train "loader" yielding one pre-built device batch ``steps`` times (no data loading in the timing)."""

    batch_sampler = None
    sampler = None

    def __init__(self, batch: tuple[Any, Any, Any], steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __iter__(self) -> Any:
        return iter([self.batch] * self.steps)

    def __len__(self) -> int:
        return self.steps


@dataclass
class Row:
    name: str
    batch: int
    input_shape: tuple[int, ...]
    params_m: float
    step_ms: float
    peak_mib: float | None
    images_s: float
    run_hours: float | None


def _to_device(obj: Any, device: torch.device, channels_last: bool) -> Any:
    if isinstance(obj, tuple):
        return tuple(_to_device(v, device, channels_last) for v in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device, False) for k, v in obj.items()}
    obj = obj.to(device)
    return obj.contiguous(memory_format=torch.channels_last) if channels_last and obj.dim() == 4 else obj


def prepare(cfg: RunConfig, device: torch.device, tiny: bool) -> tuple[RunConfig, ScenarioSpec]:
    """The config as the smoke check runs it, and the synthetic spec of its data."""
    cfg = copy.deepcopy(cfg)
    if cfg.model.backbone.weights and is_weight_name(cfg.model.backbone.weights):
        cfg.model.backbone.weights = None  # random init: same cost, nothing downloaded
    cfg.data.num_workers = 0
    cfg.train.device = str(device)
    cfg.train.amp = device.type == "cuda"
    cfg.train.progress = False
    cfg.train.tensorboard = False
    if cfg.model.arch == "single_task":  # one run per task: timed as the same T networks on one mixed batch
        cfg.model.arch = "single_task_joint"
    spec = scenario_spec(cfg.data)
    if spec is None:
        raise SystemExit(f"{cfg.name}: data.kind {cfg.data.kind!r} declares no shape; paper configs use presets")
    if tiny:
        cfg.data.batch_size = 2 * (1 if spec.heterogeneity == "single_input" else len(spec.tasks))
        spec = replace(spec, input_shape=(spec.input_shape[0], 32, 32))
        cfg.model.backbone.small_input = False  # the stem of the paper-size input, not the small-input one
    return cfg, spec


def time_config(cfg: RunConfig, spec: ScenarioSpec, device: torch.device, steps: int, warmup: int,
                train_size: int | None) -> Row:
    """Build the Trainer of ``cfg`` on a stand-in of ``spec`` and time ``steps`` training steps."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(cfg, tmp, scenario=synthetic_scenario(spec, seed=cfg.train.seed))
        model = trainer.model
        channels_last = device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())
        if channels_last:
            model.to(memory_format=torch.channels_last)
        g = torch.Generator().manual_seed(0)
        batch = _to_device(synthetic_batch(spec, cfg.data.batch_size, g), device, channels_last)
        if warmup:
            trainer.loaders["train"] = DeviceBatches(batch, warmup)  # type: ignore[assignment]
            trainer.steps_per_epoch = warmup
            trainer.train_epoch()
            trainer.epoch += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        trainer.loaders["train"] = DeviceBatches(batch, steps)  # type: ignore[assignment]
        trainer.steps_per_epoch = steps
        start = time.perf_counter()
        trainer.train_epoch()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step = (time.perf_counter() - start) / steps
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        params = sum(p.numel() for p in model.parameters()) / 1e6
    b = cfg.data.batch_size
    hours = (math.ceil(train_size / b) * cfg.train.epochs * step / 3600) if train_size else None
    return Row(cfg.name, b, tuple(spec.input_shape), params, step * 1e3, peak, b / step, hours)


def fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:1, cpu")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per config (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before (default 3)")
    p.add_argument("--tiny", action="store_true",
                   help="CI mode: 32 px inputs, batch 2 per task, 1 step, no warm-up (times mean nothing)")
    p.add_argument("--configs", nargs="*", help="config files (default: configs/paper/*.yaml)")
    p.add_argument("--rows", action="store_true", help="also time every row of configs/paper/sweeps/*.yaml")
    p.add_argument("--tables", nargs="*", help="sweeps to estimate (default: all), e.g. --tables vlcs nyuv2")
    p.add_argument("--threads", type=int, default=1, help="CPU threads on --device cpu (default 1)")
    p.add_argument("--images", action="append", default=[], metavar="KIND=N",
                   help="train images per epoch of a data kind without a known size (e.g. radimagenet=100000)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("paper_smoke: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    steps, warmup = (1, 0) if args.tiny else (args.steps, args.warmup)
    sizes = {k: int(v) for k, v in (item.split("=", 1) for item in args.images)}
    files = args.configs or sorted(glob.glob(str(ROOT / "configs/paper/*.yaml")))
    if not files:
        print("paper_smoke: no config found", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, {'bf16 autocast + channels_last' if device.type == 'cuda' else 'fp32'}, "
          f"{steps} timed steps after {warmup}{', TINY (32 px, batch 2/task)' if args.tiny else ''}")
    header = f"{'config':<24} {'batch':>5} {'input':>13} {'params M':>9} {'step ms':>9} {'peak MiB':>9} " \
             f"{'img/s':>8} {'h/run':>7}"
    print(header)
    print("-" * len(header))
    rows: dict[str, Row] = {}
    kinds: dict[str, str] = {}
    for f in files:
        cfg, spec = prepare(load_config(f), device, args.tiny)
        row = time_config(cfg, spec, device, steps, warmup, sizes.get(cfg.data.kind, spec.train_size))
        rows[Path(f).stem], kinds[Path(f).stem] = row, cfg.data.kind
        print(f"{row.name:<24} {row.batch:>5} {'x'.join(map(str, row.input_shape)):>13} {row.params_m:>9.2f} "
              f"{row.step_ms:>9.1f} {fmt(row.peak_mib, '9.0f'):>9} {row.images_s:>8.1f} "
              f"{fmt(row.run_hours, '7.2f'):>7}")
    print()
    print(table_estimates(rows, device, args, steps, warmup, sizes))
    if args.tiny:
        print("(--tiny: 32 px inputs, tiny batches, one step without warm-up; these times and hours are not the "
              "paper's)")
    return 0


def table_estimates(rows: dict[str, Row], device: torch.device, args: argparse.Namespace, steps: int, warmup: int,
                    sizes: dict[str, int]) -> str:
    """Estimated GPU hours of each paper sweep (configs/paper/sweeps/<benchmark>.yaml)."""
    from mola.cli.sweep import load_sweep, plan_sweep

    lines = [f"{'table (sweep)':<24} {'runs':>5} {'est. hours':>11}  how"]
    for path in sorted(glob.glob(str(ROOT / "configs/paper/sweeps/*.yaml"))):
        if args.tables and Path(path).stem not in args.tables:
            continue
        spec = load_sweep(path)
        plan = [r for r in plan_sweep(spec) if r.status != "invalid"]
        bench = Path(path).stem
        mine = [rows[k].run_hours for k in (f"{bench}_grad", f"{bench}_router") if k in rows]
        if args.rows:
            total: float | None = 0.0
            for run in plan:
                cfg, sspec = prepare(load_config(spec.base, run.overrides, arch=run.arch, weighting=run.weighting,
                                                 method=run.method), device, args.tiny)
                if run.seed is not None:
                    cfg.train.seed = run.seed
                row = time_config(cfg, sspec, device, steps, warmup, sizes.get(cfg.data.kind, sspec.train_size))
                total = None if total is None or row.run_hours is None else total + row.run_hours
            how = "every row timed"
        elif mine and all(h is not None for h in mine):
            total = len(plan) * sum(h for h in mine if h is not None) / len(mine)
            how = "runs x mean of its MoLA-Grad/Router runs"
        else:
            total, how = None, "no timed MoLA config of this benchmark, or unknown train size (--images KIND=N)"
        lines.append(f"{bench:<24} {len(plan):>5} {fmt(total, '11.1f')}  {how}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
