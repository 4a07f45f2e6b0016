"""MoLA-Router on a Vision Transformer: adapters in the attention and MLP Linear layers, no task id at test time.

Domain heterogeneity on synthetic data: three domains (each its own colour cast and noise level) share one
label space of four classes and one classification head. The router reads the image, mixes the adapters per
input and is trained with the TwD loss on the domain ids; at test time the model gets images only.

Two backbones:

- ``--backbone vit_small`` (default): mola's small ViT (timm-style names ``blocks.N.attn.qkv``,
  ``blocks.N.attn.proj``, ``blocks.N.mlp.fc1``, ``blocks.N.mlp.fc2``); MoLA goes into all four Linear layers of
  the last ``--mola-blocks`` blocks, with rank 2 in ``qkv`` and ``--rank`` elsewhere;
- ``--backbone torchvision``: ``torchvision.models.VisionTransformer`` (the class of ``vit_b_16``) at a tiny
  size; the ``last_stage`` preset wraps the MLP Linear layers of its last blocks. Its attention is an
  ``nn.MultiheadAttention``, which reads its projections as raw weights, so those cannot be wrapped.

    python examples/vit.py                                  # 32 px, 150 steps
    python examples/vit.py --steps 3 --image-size 16        # a smoke run

Writes ``OUT/summary.json``: accuracy per domain, the mean router weights per domain, and how well the domain
can be inferred from the router code z (nearest domain centroid).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

import mola
from mola.analysis.routing import mean_weights_per_task, task_inference_accuracy
from mola.models import BackboneConfig, build_backbone

DOMAINS = ("plain", "tinted", "noisy")
NUM_CLASSES = 4


class SyntheticDomains:
    """Four class prototypes shared by three domains; domain d shifts colours and scales the noise."""

    def __init__(self, image_size: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        low = max(2, image_size // 8)
        self.protos = F.interpolate(torch.randn(NUM_CLASSES, 3, low, low, generator=g), size=image_size,
                                    mode="bilinear")
        self.cast = torch.tensor([[0.0, 0.0, 0.0], [1.5, -1.0, 0.5], [-0.5, 0.5, -1.5]]).view(3, 3, 1, 1)
        self.noise = torch.tensor([0.3, 0.5, 1.0]).view(3, 1, 1, 1)
        self.g = torch.Generator().manual_seed(seed + 1)  # draws of the training batches

    def batch(self, size: int, g: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(images, labels, domain ids), drawn with ``g`` (default: the training generator)."""
        g = g or self.g
        d = torch.randint(len(DOMAINS), (size,), generator=g)
        y = torch.randint(NUM_CLASSES, (size,), generator=g)
        x = self.protos[y] + self.cast[d] + self.noise[d] * torch.randn(size, *self.protos.shape[1:], generator=g)
        return x, y, d


def build(args: argparse.Namespace) -> tuple[mola.MoLAModel, int]:
    """The ViT encoder with MoLA injected (router mode) and its feature size."""
    if args.backbone == "vit_small":
        net = build_backbone(
            BackboneConfig(name="vit_small", options={"patch": args.patch, "dim": args.dim, "depth": args.depth,
                                                      "heads": 2}),
            (3, args.image_size, args.image_size), dense=False)
        first = args.depth - args.mola_blocks
        blocks = "|".join(str(i) for i in range(first, args.depth))
        targets: str | list[str] = [rf"re:blocks\.({blocks})\.(attn\.(qkv|proj)|mlp\.fc[12])"]
        rank: int | dict[str, int] = {"qkv": 2, "*": args.rank}
        dim = net.out_dim
    else:
        net = torchvision.models.VisionTransformer(image_size=args.image_size, patch_size=args.patch,
                                                   num_layers=args.depth, num_heads=2, hidden_dim=args.dim,
                                                   mlp_dim=2 * args.dim)
        net.heads = nn.Identity()  # return the class-token features; the head is ours
        targets, rank, dim = "last_stage", args.rank, args.dim
    cfg = mola.MoLAConfig(mode="router", num_experts=len(DOMAINS), rank=rank, target_modules=targets,
                          router_input_size=args.router_input_size)
    return mola.inject(net, cfg), dim


@torch.no_grad()
def routing_stats(model: mola.MoLAModel, x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Router weights w (B, E) and codes z (B, d) for images x (no task ids)."""
    model.set_routing(x)
    r = model.routing
    assert r.weights is not None and r.z is not None
    return r.weights.float().numpy(), r.z.float().numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", choices=["vit_small", "torchvision"], default="vit_small")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--mola-blocks", type=int, default=2, help="vit_small: MoLA in the last N blocks")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--router-input-size", type=int, default=16, help="side of the router's copy of the input")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-size", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", type=Path, default=Path("runs/example_vit"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    model, dim = build(args)
    print(f"{args.backbone}: MoLA layers {model.layer_names}")
    print("parameters:", model.num_parameters())
    head = nn.Linear(dim, NUM_CLASSES)  # one head: the domains share their label space
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=args.lr)
    data = SyntheticDomains(args.image_size, args.seed)
    model.train()
    for step in range(args.steps):
        x, y, d = data.batch(args.batch_size)
        logits = head(model(x, task_ids=d))  # router mode: the ids only feed the TwD loss
        loss = F.cross_entropy(logits, y) + model.config.twd_weight * model.twd_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {float(loss.detach()):.3f}")

    model.eval()
    x_tr, _, d_tr = data.batch(args.eval_size)  # fresh training-distribution samples for the domain centroids
    x, y, d = data.batch(args.eval_size, torch.Generator().manual_seed(args.seed + 2))  # held-out test samples
    with torch.no_grad():
        pred = head(model(x)).argmax(1)  # images only: no domain id at test time
    acc = {name: float((pred[d == i] == y[d == i]).float().mean()) for i, name in enumerate(DOMAINS)}
    acc["mean"] = float(np.mean(list(acc.values())))
    w, z = routing_stats(model, x)
    _, z_tr = routing_stats(model, x_tr)
    mean_w = mean_weights_per_task(w, d.numpy(), len(DOMAINS))
    inferred = task_inference_accuracy(z_tr, d_tr.numpy(), z, d.numpy(), len(DOMAINS))
    print("test accuracy (no domain ids): " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    print("mean router weights per domain (rows: domains, columns: adapters):")
    for name, row in zip(DOMAINS, mean_w, strict=True):
        print(f"  {name:>7}  " + "  ".join(f"{v:.2f}" for v in row))
    print(f"domain inferred from the router code z (nearest centroid): {inferred:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"backbone": args.backbone, "mola_layers": model.layer_names, "accuracy": acc,
               "mean_router_weights": mean_w.tolist(), "domain_inference_accuracy": inferred}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
