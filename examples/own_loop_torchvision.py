"""MoLA in your own training loop on a torchvision ResNet-18: task ids, MoLA-Grad, MoLA-Router + TwD.

Synthetic multi-input task data stands in for your data loader: three tasks, each with its own images (a
task-specific colour cast) and its own label space (2, 3 and 4 classes of noisy prototype patterns). The
script trains MoLA-Grad, then MoLA-Router with the TwD loss, on a ResNet-18 whose ``layer4`` convolutions
carry the adapters, reports test accuracy per task, saves and reloads the model, writes the adapters file
and folds task 0's adapter into a plain ResNet-18 for deployment.

    python examples/own_loop_torchvision.py                                   # 32 px, 100 steps per mode
    python examples/own_loop_torchvision.py --steps 3 --image-size 32 --batch-size 12   # a smoke run

Writes ``OUT/{grad,router}_model.pt`` (model + heads state), ``OUT/{grad,router}_adapters.safetensors`` and
``OUT/summary.json`` (accuracies and the merge check).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

import mola

NUM_CLASSES = (2, 3, 4)  # one label space per task


class SyntheticTasks:
    """Per-task prototype images plus noise; task t's images also carry a colour cast of their own."""

    def __init__(self, image_size: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        low = max(4, image_size // 8)
        self.protos = [
            F.interpolate(torch.randn(k, 3, low, low, generator=g), size=image_size, mode="bilinear")
            for k in NUM_CLASSES
        ]
        self.cast = torch.randn(len(NUM_CLASSES), 3, 1, 1, generator=g)
        self.g = torch.Generator().manual_seed(seed + 1)  # draws of the training batches

    def batch(self, size: int, g: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(images, labels, task ids), tasks and classes uniform, drawn with ``g`` (default: the training one)."""
        g = g or self.g
        t = torch.randint(len(NUM_CLASSES), (size,), generator=g)
        y = torch.stack([torch.randint(NUM_CLASSES[int(k)], (), generator=g) for k in t])
        x = torch.stack([self.protos[int(k)][int(c)] for k, c in zip(t, y, strict=True)])
        x = x + self.cast[t] + 0.8 * torch.randn(x.shape, generator=g)
        return x, y, t


def build(mode: str, router_input_size: int) -> tuple[mola.MoLAModel, nn.ModuleList]:
    """ResNet-18 without its classifier, MoLA in layer4, one linear head per task."""
    net = torchvision.models.resnet18()  # weights=None: random init, nothing downloaded
    net.fc = nn.Identity()  # the encoder returns 512-d features; the heads are ours
    cfg = mola.MoLAConfig(mode=mode, num_experts=len(NUM_CLASSES), rank=4, target_modules="last_stage",
                          router_input_size=router_input_size)
    model = mola.inject(net, cfg)
    heads = nn.ModuleList(nn.Linear(512, k) for k in NUM_CLASSES)
    return model, heads


def task_loss(feats: Tensor, y: Tensor, t: Tensor, heads: nn.ModuleList) -> Tensor:
    """Sum over the tasks present in the batch of each task's mean cross-entropy (method.md §6)."""
    return sum(F.cross_entropy(heads[k](feats[t == k]), y[t == k]) for k in t.unique().tolist())


def train(mode: str, data: SyntheticTasks, args: argparse.Namespace) -> tuple[mola.MoLAModel, nn.ModuleList]:
    """Your own loop: forward with task ids, per-task losses, + lambda * TwD in router mode."""
    model, heads = build(mode, args.router_input_size)
    params = list(model.parameters()) + list(heads.parameters())  # backbone, adapters, router, lift, heads
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    for step in range(args.steps):
        x, y, t = data.batch(args.batch_size)
        feats = model(x, task_ids=t)  # grad: sample b uses adapter t_b; router: t only feeds the TwD loss
        loss = task_loss(feats, y, t, heads)
        if mode == "router":
            loss = loss + model.config.twd_weight * model.twd_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"{mode} step {step:4d}  loss {float(loss.detach()):.3f}")
    return model, heads


@torch.no_grad()
def evaluate(mode: str, model: mola.MoLAModel, heads: nn.ModuleList, x: Tensor, y: Tensor,
             t: Tensor) -> dict[str, float]:
    """Accuracy per task; the router routes without task ids (the head is still picked by the task)."""
    model.eval()
    feats = model(x, task_ids=t) if mode == "grad" else model(x)
    return {f"task{k}": float((heads[k](feats[t == k]).argmax(1) == y[t == k]).float().mean())
            for k in range(len(NUM_CLASSES))}


@torch.no_grad()
def merge_check(model: mola.MoLAModel, heads: nn.ModuleList, x: Tensor) -> float:
    """Fold adapter 0 into a plain ResNet-18; max |difference| of the task-0 logits relative to their max |value|."""
    model.eval()
    plain = model.merge(0).eval()  # an ordinary torchvision ResNet-18: no MoLA layer, no task ids
    ids = torch.zeros(len(x), dtype=torch.long)
    ref = heads[0](model(x, task_ids=ids))
    return float((heads[0](plain(x)) - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100, help="training steps per mode")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-size", type=int, default=300, help="test samples")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--router-input-size", type=int, default=32, help="side of the router's copy of the input")
    p.add_argument("--modes", nargs="+", choices=["grad", "router"], default=["grad", "router"])
    p.add_argument("--out", type=Path, default=Path("runs/example_own_loop"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    data = SyntheticTasks(args.image_size, args.seed)
    x_test, y_test, t_test = data.batch(args.eval_size, torch.Generator().manual_seed(args.seed + 2))  # held out
    summary: dict[str, dict[str, float]] = {}
    for mode in args.modes:
        model, heads = train(mode, data, args)
        acc = evaluate(mode, model, heads, x_test, y_test, t_test)
        acc["mean"] = sum(acc.values()) / len(acc)
        print(f"{mode}: test accuracy " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items()))
        # a full checkpoint: backbone (trained too), adapters, router/lift and heads
        torch.save({"model": model.state_dict(), "heads": heads.state_dict()}, args.out / f"{mode}_model.pt")
        # the adapters file: adapters, router, lift and the MoLA config (not the backbone weights)
        model.save_adapters(args.out / f"{mode}_adapters.safetensors")
        fresh, fresh_heads = build(mode, args.router_input_size)
        state = torch.load(args.out / f"{mode}_model.pt", weights_only=True)
        fresh.load_state_dict(state["model"])
        fresh_heads.load_state_dict(state["heads"])
        fresh.load_adapters(args.out / f"{mode}_adapters.safetensors")  # checks config and shapes
        reloaded = evaluate(mode, fresh, fresh_heads, x_test, y_test, t_test)
        assert all(abs(reloaded[k] - acc[k]) < 1e-6 for k in reloaded), "reloaded model differs"
        if mode == "grad":
            diff = merge_check(model, heads, x_test[t_test == 0])
            print(f"grad: merged task-0 ResNet-18 vs MoLA model, relative max |diff| = {diff:.1e}")
            acc["merge_max_abs_diff"] = diff
        summary[mode] = acc
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
