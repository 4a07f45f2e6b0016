"""How MoLA's step time scales with the number of tasks T (= adapters E), the rank r and the batch size, and
what mixed-task inference costs, against the plain ResNet-18 measured in the same process.

Tables (ms/step medians; "x plain" = ratio to the plain backbone at the same batch, size, dtype, format):
  1. tasks T = E      MoLA-Grad (task ids, compute auto) and MoLA-Router (full step incl. router and TwD)
  2. rank r           same two methods, T fixed
  3. batch size       plain is re-measured at every batch size
  4. inference        eval mode, torch.inference_mode, a batch mixing all T tasks (MoLA-Grad also with a
                      single-task batch, the case where one merged weight serves the whole batch)
Within a table all variants are built first and then timed round-robin (see benchlib.run_variants).
Examples:
  python benchmarks/bench_scaling.py --smoke
  python benchmarks/bench_scaling.py --batch 16 --size 32 --steps 3 --threads 1
  python benchmarks/bench_scaling.py --device cuda --batch 128 --size 224 --dtype bf16 --channels-last
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from bench_mola import Bench, _size_arg
from benchlib import Result, Variant, describe, markdown_table, pick_device, ratio, run_variants

import mola


def int_list(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from err
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16, help="batch size of tables 1, 2 and 4")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--tasks", type=int, default=4, help="T = E of tables 2, 3 and 4")
    p.add_argument("--rank", type=int, default=4, help="rank of tables 1, 3 and 4")
    p.add_argument("--layout", choices=["kernel", "factorized"], default="kernel")
    p.add_argument("--targets", choices=["last_stage", "all_stages"], default="last_stage")
    p.add_argument("--router-input-size", type=_size_arg, default=mola.MoLAConfig().router_input_size,
                   help="router_input_size: a side in pixels, auto or none (default: the MoLAConfig default)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--task-list", type=int_list, default=[2, 4, 8, 16, 32])
    p.add_argument("--rank-list", type=int_list, default=[1, 4, 16, 64])
    p.add_argument("--batch-list", type=int_list, default=[8, 16, 32, 64])
    p.add_argument("--tables", default="tasks,rank,batch,infer", help="comma list of tasks, rank, batch, infer")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run for CI (seconds)")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.size, args.tasks, args.rank, args.steps, args.warmup = 4, 32, 2, 2, 1, 0
        args.task_list, args.rank_list, args.batch_list = [2, 3], [1, 2], [2, 4]
        args.device, args.threads, args.compile = "cpu", 1, False
    if args.compile:
        args.warmup = max(args.warmup, 3)
    return args


def bench_for(args: argparse.Namespace, **over: int) -> Bench:
    a = copy.copy(args)
    for k, v in over.items():
        setattr(a, k, v)
    return Bench(a)


def sweep(args: argparse.Namespace, key: str, values: list[int], log) -> list[list[str]]:
    """One row per value of ``key``: plain (re-measured per batch size), MoLA-Grad and MoLA-Router."""
    variants: list[Variant] = []
    plain_of: dict[int, str] = {}
    for val in values:
        b = bench_for(args, **{key: val})
        if key == "batch" or not plain_of:
            name = f"plain {key}={val}"
            variants.append(Variant(name, b.build_plain))
            plain_of[val] = name
        else:
            plain_of[val] = next(iter(plain_of.values()))
        variants.append(Variant(f"grad {key}={val}", lambda b=b: b.build_grad(args.layout)))
        variants.append(Variant(f"router {key}={val}", lambda b=b: b.build_router_full(args.layout)))
    res = {r.name: r for r in run_variants(variants, pick_device(args.device), args.steps, args.warmup, log,
                                           memory=False)}
    rows = []
    for val in values:
        p, g, r = res[plain_of[val]], res[f"grad {key}={val}"], res[f"router {key}={val}"]
        rows.append([str(val), f"{p.ms:.1f}", f"{g.ms:.1f}", ratio(g.ms, p.ms), f"{r.ms:.1f}", ratio(r.ms, p.ms)])
    return rows


def inference(args: argparse.Namespace, log) -> list[list[str]]:
    b = bench_for(args)
    other = "factorized" if args.layout == "kernel" else "kernel"
    variants = [Variant("plain ResNet-18", b.build_eval_plain)]
    for lay in (args.layout, other):
        variants.append(Variant(f"MoLA-Grad {lay}, {args.tasks} tasks mixed",
                                lambda lay=lay: b.build_eval("grad", lay)))
    variants.append(Variant(f"MoLA-Grad {args.layout}, one task", lambda: b.build_eval("grad", args.layout, True)))
    for lay in (args.layout, other):
        variants.append(Variant(f"MoLA-Router {lay} (router incl.)", lambda lay=lay: b.build_eval("router", lay)))
    res: list[Result] = run_variants(variants, b.device, args.steps, args.warmup, log, memory=False)
    return [[r.name, f"{r.ms:.1f}", ratio(r.ms, res[0].ms)] for r in res]


SWEEP_HEADER = ("{key}", "plain ms", "MoLA-Grad ms", "x plain", "MoLA-Router ms", "x plain")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    args.device = str(device)
    tables = {t.strip() for t in args.tables.split(",") if t.strip()}
    unknown = tables - {"tasks", "rank", "batch", "infer"}
    if unknown:
        raise SystemExit(f"unknown --tables {sorted(unknown)}")

    def log(msg: str) -> None:
        print(f"  {msg}", file=sys.stderr, flush=True)

    print(f"# bench_scaling: {describe(device)}")
    print(f"# batch={args.batch} size={args.size} tasks={args.tasks} rank={args.rank} layout={args.layout} "
          f"targets={args.targets} router_input_size={args.router_input_size} dtype={args.dtype} "
          f"channels_last={args.channels_last} compile={args.compile} steps={args.steps} warmup={args.warmup}")
    print("# training step = forward + cross-entropy (+ 0.1*TwD for the router) + backward + SGD")
    specs = [("tasks", "T = E", args.task_list), ("rank", "rank r", args.rank_list),
             ("batch", "batch", args.batch_list)]
    for key, label, values in specs:
        if key in tables:
            print(f"\n## training step vs {label} ({args.layout} layout)")
            header = [h.format(key=label) for h in SWEEP_HEADER]
            print(markdown_table(header, sweep(args, key, values, log)), flush=True)
    if "infer" in tables:
        print(f"\n## mixed-task inference (eval, no grad), batch {args.batch}, {args.tasks} tasks")
        print(markdown_table(["variant", "ms/batch (median)", "x plain"], inference(args, log)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
