"""Training-step time and peak memory of MoLA on a torchvision ResNet-18, against the plain backbone.

Rows (one process, same memory format and precision for every row):
  plain                          torchvision resnet18(num_classes=10)
  MoLA-Grad <layout>             task ids -> one merged weight per task present, one conv per task chunk
  MoLA-Router <layout>           full step: router + backbone with adapters + cross-entropy + 0.1 * TwD
    backbone+adapters            the same model fed fixed (B, E) mixing weights: the dense low-rank path only
  router net alone               the shared router (its input resized as --router-input-size says), fwd+bwd
  ... [candidate]                with --router-candidates: the full router step (factorized) and the router net
                                 alone for each router option set, e.g. the pre-0.x router "size=none"
  per-sample grouped conv        the released code's maths: one weight per sample and one grouped conv over the
                                 batch in every MoLA layer (MoLA-Grad routing, kernel layout)

A training step is forward + cross-entropy + backward + SGD step. Ratios are against the plain row.
Examples:
  python benchmarks/bench_mola.py --smoke
  python benchmarks/bench_mola.py --batch 32 --size 64 --tasks 4 --rank 4 --steps 5
  python benchmarks/bench_mola.py --variants router --router-candidates "size=none;size=32,blocks=2"
  python benchmarks/bench_mola.py --device cuda --batch 144 --size 224 --dtype bf16 --channels-last
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable

import torch
import torchvision
from benchlib import (
    HEADER,
    Result,
    Variant,
    describe,
    eval_step,
    images,
    markdown_table,
    mixed_task_ids,
    pick_device,
    prepare,
    randomize_adapters,
    result_rows,
    run_variants,
    seeded,
    swap_in_baseline,
    train_step,
)
from torch import nn

import mola

NUM_CLASSES = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--tasks", type=int, default=4, help="T = E, the number of tasks / adapters")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--layout", choices=["kernel", "factorized", "both"], default="both")
    p.add_argument("--targets", choices=["last_stage", "all_stages"], default="last_stage")
    defaults = mola.MoLAConfig()
    p.add_argument("--router-input-size", type=_size_arg, default=defaults.router_input_size,
                   help="router_input_size: a side in pixels, auto or none (default: the MoLAConfig default)")
    p.add_argument("--router-width", type=int, default=defaults.router_width)
    p.add_argument("--router-blocks", type=int, default=defaults.router_blocks)
    p.add_argument("--router-stem-stride", type=int, default=defaults.router_stem_stride, choices=[1, 2])
    p.add_argument("--router-candidates", default="",
                   help="';'-separated router option sets (keys size, width, blocks, stride), each measured as "
                        "a full router step and router net row, e.g. 'size=none;size=32,blocks=2'")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = torch.autocast bfloat16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every model (warmup >= 3 includes compilation)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch default); 1 is far steadier on a shared, loaded CPU")
    p.add_argument("--variants", default="plain,grad,router,baseline",
                   help="comma list of plain, grad, router, baseline (plain is always measured)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU run for CI: batch 4, 16 px, 2 tasks, 1 step, 1 thread")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.size, args.tasks, args.steps, args.warmup = 4, 16, 2, 1, 1
        args.device, args.threads = "cpu", 1
        args.compile = False
    if args.compile:
        args.warmup = max(args.warmup, 3)
    for key in ("batch", "size", "tasks", "rank", "steps"):
        if getattr(args, key) < 1:
            p.error(f"--{key} must be >= 1")
    return args


def _size_arg(text: str) -> int | str | None:
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    return "auto" if low == "auto" else int(low)


CANDIDATE_KEYS = {"size": "router_input_size", "width": "router_width", "blocks": "router_blocks",
                  "stride": "router_stem_stride"}


def parse_candidates(text: str) -> list[tuple[str, dict[str, object]]]:
    """'size=none;size=32,blocks=2' -> [(label, MoLAConfig router options), ...]."""
    out = []
    for spec in (s.strip() for s in text.split(";")):
        if not spec:
            continue
        opts: dict[str, object] = {}
        for item in spec.split(","):
            key, _, value = item.partition("=")
            if key.strip() not in CANDIDATE_KEYS:
                raise SystemExit(f"--router-candidates: unknown key {key.strip()!r} in {spec!r}; "
                                 f"expected {sorted(CANDIDATE_KEYS)}")
            name = CANDIDATE_KEYS[key.strip()]
            opts[name] = _size_arg(value) if key.strip() == "size" else int(value)
        out.append((spec, opts))
    return out


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = pick_device(args.device)
        self.x, self.y = images(args.batch, args.size, self.device, args.channels_last)
        self.ids = mixed_task_ids(args.batch, args.tasks, self.device)
        defaults = mola.MoLAConfig()  # scripts reusing Bench (bench_scaling.py) may leave router options out
        self.router_opts: dict[str, object] = {
            key: getattr(args, key, getattr(defaults, key))
            for key in ("router_input_size", "router_width", "router_blocks", "router_stem_stride")}
        self.candidates = parse_candidates(getattr(args, "router_candidates", ""))

    # -- builders ------------------------------------------------------------------------------------
    def _maybe_compile(self, model: nn.Module) -> Callable:
        return torch.compile(model) if self.args.compile else model

    _template: nn.Module | None = None

    def backbone(self) -> nn.Module:
        """A fresh copy of one seeded torchvision ResNet-18 (copying is much cheaper than re-initialising)."""
        if Bench._template is None:
            with seeded(0):
                Bench._template = torchvision.models.resnet18(num_classes=NUM_CLASSES)
        return copy.deepcopy(Bench._template)

    def router_side(self, opts: dict[str, object] | None = None) -> int:
        """The side the router's copy of the benchmark input has."""
        o = {**self.router_opts, **(opts or {})}
        router = mola.layers.Router(3, 1, input_size=o["router_input_size"])  # type: ignore[arg-type]
        return router.resolved_input_size((self.args.size, self.args.size)) or self.args.size

    def mola_model(self, mode: str, layout: str, opts: dict[str, object] | None = None) -> mola.MoLAModel:
        a = self.args
        router_opts = {**self.router_opts, **(opts or {})}
        cfg = mola.MoLAConfig(mode=mode, num_experts=a.tasks, rank=a.rank, layout=layout, target_modules=a.targets,
                              **router_opts)  # type: ignore[arg-type]
        with seeded(1):
            model = mola.inject(self.backbone(), cfg)
        randomize_adapters(model)
        return prepare(model, self.device, a.channels_last)  # type: ignore[return-value]

    def _step(self, forward: Callable, params: list[nn.Parameter], target: torch.Tensor | None = None,
              extra: Callable | None = None) -> Callable:
        tgt = self.y if target is None else target
        return train_step(forward, tgt, params, self.device, self.args.dtype, extra)

    def build_plain(self) -> Callable:
        model = prepare(self.backbone(), self.device, self.args.channels_last)
        fn = self._maybe_compile(model)
        return self._step(lambda: fn(self.x), list(model.parameters()))

    def build_grad(self, layout: str, baseline: bool = False) -> Callable:
        model = self.mola_model("grad", layout)
        if baseline:
            swap_in_baseline(model)
        fn = self._maybe_compile(model)
        return self._step(lambda: fn(self.x, task_ids=self.ids), list(model.parameters()))

    def build_router_full(self, layout: str, opts: dict[str, object] | None = None) -> Callable:
        model = self.mola_model("router", layout, opts)
        fn = self._maybe_compile(model)
        lam = model.config.twd_weight
        return self._step(lambda: fn(self.x, task_ids=self.ids), list(model.parameters()),
                          extra=lambda: lam * model.twd_loss())

    def build_router_backbone(self, layout: str) -> Callable:
        model = self.mola_model("router", layout)
        fn = self._maybe_compile(model)
        with seeded(2):
            logits = torch.randn(self.args.batch, self.args.tasks)
        w = torch.softmax(logits, -1).to(self.device).requires_grad_(True)  # grads flow into w as in training

        def forward() -> torch.Tensor:
            w.grad = None
            return fn(self.x, weights=w)

        return self._step(forward, list(model.model.parameters()))

    def build_router_net(self, opts: dict[str, object] | None = None) -> Callable:
        model = self.mola_model("router", "factorized", opts)
        router = model.router
        assert router is not None
        del model
        fn = self._maybe_compile(router)
        return self._step(lambda: fn(self.x), list(router.parameters()), target=self.ids)

    # -- inference (eval mode, no autograd) --------------------------------------------------------
    def build_eval_plain(self) -> Callable:
        model = prepare(self.backbone(), self.device, self.args.channels_last).eval()
        fn = self._maybe_compile(model)
        return eval_step(lambda: fn(self.x), self.device, self.args.dtype)

    def build_eval(self, mode: str, layout: str, one_task: bool = False) -> Callable:
        model = self.mola_model(mode, layout).eval()
        fn = self._maybe_compile(model)
        ids = torch.zeros_like(self.ids) if one_task else self.ids
        if mode == "grad":
            return eval_step(lambda: fn(self.x, task_ids=ids), self.device, self.args.dtype)
        return eval_step(lambda: fn(self.x), self.device, self.args.dtype)

    # -- the table -----------------------------------------------------------------------------------
    def run(self) -> tuple[list[Result], Result]:
        a = self.args
        wanted = {v.strip() for v in a.variants.split(",") if v.strip()}
        unknown = wanted - {"plain", "grad", "router", "baseline"}
        if unknown:
            raise SystemExit(f"unknown --variants {sorted(unknown)}")
        layouts = ["kernel", "factorized"] if a.layout == "both" else [a.layout]
        v = [Variant("plain ResNet-18", self.build_plain, "torchvision resnet18(num_classes=10)")]
        if "grad" in wanted:
            v += [Variant(f"MoLA-Grad {lay}", lambda lay=lay: self.build_grad(lay), "task ids, compute auto")
                  for lay in layouts]
        if "router" in wanted:
            for lay in layouts:
                v.append(Variant(f"MoLA-Router {lay} (full step)", lambda lay=lay: self.build_router_full(lay),
                                 "router + backbone + CE + 0.1*TwD"))
                v.append(Variant(f"  backbone+adapters {lay}", lambda lay=lay: self.build_router_backbone(lay),
                                 "fixed (B,E) weights, dense path"))
            v.append(Variant(f"router net alone ({self.router_side()}px)", self.build_router_net,
                             "forward+backward of the shared router"))
            for label, opts in self.candidates:
                v.append(Variant(f"MoLA-Router factorized [{label}]",
                                 lambda opts=opts: self.build_router_full("factorized", opts),
                                 f"full step, router at {self.router_side(opts)}px"))
                v.append(Variant(f"  router net alone [{label}]", lambda opts=opts: self.build_router_net(opts),
                                 "forward+backward of that router"))
        base_layout = "kernel" if "kernel" in layouts else layouts[0]
        if "baseline" in wanted:
            v.append(Variant(f"per-sample grouped conv ({base_layout})",
                             lambda: self.build_grad(base_layout, baseline=True),
                             "released-code maths, MoLA-Grad routing"))
        results = run_variants(v, self.device, a.steps, a.warmup,
                               log=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
        by_name = {r.name: r for r in results}
        net = next((r for r in results if r.name.startswith("router net")), None)
        for lay in layouts:
            full, bb = by_name.get(f"MoLA-Router {lay} (full step)"), by_name.get(f"  backbone+adapters {lay}")
            if full is not None and bb is not None and net is not None:
                full.note += f"; router net = {net.ms / bb.ms:.2f}x backbone+adapters"
        base, grad = by_name.get(f"per-sample grouped conv ({base_layout})"), by_name.get(f"MoLA-Grad {base_layout}")
        if base is not None and grad is not None:
            base.note += f"; MoLA-Grad {base_layout} is {base.ms / grad.ms:.1f}x faster"
        return results, results[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    bench = Bench(args)
    print(f"# bench_mola: {describe(bench.device)}")
    print(f"# batch={args.batch} size={args.size} tasks={args.tasks} rank={args.rank} layout={args.layout} "
          f"targets={args.targets} router: input_size={args.router_input_size} ({bench.router_side()}px) "
          f"width={args.router_width} blocks={args.router_blocks} stem_stride={args.router_stem_stride} "
          f"dtype={args.dtype} "
          f"channels_last={args.channels_last} compile={args.compile} steps={args.steps} warmup={args.warmup}")
    mem_kind = "torch.cuda.max_memory_allocated" if bench.device.type == "cuda" else "peak RSS delta"
    print(f"# step = forward + cross-entropy + backward + SGD; memory = {mem_kind} of the variant")
    results, plain = bench.run()
    print(markdown_table(HEADER, result_rows(results, plain)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
