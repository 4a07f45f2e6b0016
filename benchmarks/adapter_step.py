"""How large a step do the adapters take next to the shared weight? (issue 14: MoLA-Grad's seed swings)

For each (alpha, lr) this trains the same model from the same seed for ``--steps`` SGD steps (no schedule) and
prints, averaged over MoLA layers and steps, the relative change per step of the shared weight W0
(||dW0|| / ||W0||) and of each task's effective adapter term s * B_e A_e (||d(s B_e A_e)|| / ||W0||), their ratio,
and how large the adapter term has grown after the last step (||s B_e A_e|| / ||W0||).

With B_e = 0 at init, a step changes s * B_e A_e by about lr * s^2 * g A_e^T A_e: the adapters' effective step
grows with s^2 = (alpha / r)^2 at a fixed learning rate, while W0's does not.

    python benchmarks/adapter_step.py                     # manytask, MoLA-Grad, alpha 1/4/16 at lr 0.05
    python benchmarks/adapter_step.py --smoke             # a few steps on a small subset (CI-sized)
"""

from __future__ import annotations

import argparse
import copy

import torch

from mola.engine import Trainer, load_config
from mola.layers.adapter import MoLALayer


def _snapshot(layers: list[MoLALayer]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    with torch.no_grad():
        return [(m.base_layer.weight.detach().clone(), (m.scaling * m.delta_weights()).detach().clone())
                for m in layers]


def measure(config: str, alpha: float, lr: float, steps: int, seed: int, extra: list[str]) -> dict[str, float]:
    """Train ``steps`` steps and return mean per-step relative updates of W0 and of s * B_e A_e."""
    cfg = load_config(config, ["train.tensorboard=false", "train.progress=false", "optim.scheduler=none",
                               f"optim.lr={lr}", f"model.mola.alpha={alpha}", "train.max_steps_per_epoch=1",
                               f"train.epochs={steps}", f"train.seed={seed}", *extra], method="mola_grad")
    trainer = Trainer(cfg, "/tmp/mola_adapter_step")
    layers = [m for m in trainer.model.modules() if isinstance(m, MoLALayer)]
    if not layers:
        raise SystemExit("the config injects no MoLA layer")
    u0, ua = [], []
    before = _snapshot(layers)
    for step in range(steps):
        trainer.epoch = step  # one batch per "epoch": each call trains on the next seeded batch
        trainer.train_epoch()
        after = _snapshot(layers)
        for (w0, d0), (w1, d1) in zip(before, after, strict=True):
            norm = w0.norm().clamp_min(1e-12)
            u0.append(float((w1 - w0).norm() / norm))
            ua.append(float(((d1 - d0).flatten(1).norm(dim=1) / norm).mean()))
        before = after
    with torch.no_grad():
        grown = [float(((m.scaling * m.delta_weights()).flatten(1).norm(dim=1)
                        / m.base_layer.weight.norm()).mean()) for m in layers]
    return {"alpha": alpha, "s": alpha / layers[0].rank, "lr": lr, "dW0": sum(u0) / len(u0),
            "dAdapter": sum(ua) / len(ua), "ratio": sum(ua) / max(sum(u0), 1e-12),
            "adapter_size": sum(grown) / len(grown)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/manytask.yaml")
    p.add_argument("--alphas", type=float, nargs="+", default=[1.0, 4.0, 16.0])
    p.add_argument("--lrs", type=float, nargs="+", default=[0.05])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="5 steps on 64 images per task")
    args = p.parse_args()
    extra = ["data.max_per_task=64", "data.max_eval_per_task=16", "data.batch_size=32"] if args.smoke else []
    steps = 5 if args.smoke else args.steps
    torch.set_num_threads(1)
    rows = [measure(args.config, a, lr, steps, args.seed, copy.copy(extra)) for lr in args.lrs for a in args.alphas]
    print(f"| alpha | s = alpha/r | lr | ||dW0||/||W0|| per step | ||d(s B A)||/||W0|| per step | adapter/W0 step "
          f"| ||s B A||/||W0|| after {steps} steps |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['alpha']:g} | {r['s']:g} | {r['lr']:g} | {r['dW0']:.2e} | {r['dAdapter']:.2e} | {r['ratio']:.3f} "
              f"| {r['adapter_size']:.3f} |")


if __name__ == "__main__":
    main()
