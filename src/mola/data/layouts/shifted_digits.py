"""``shifted_digits``: a family of digit-domain scenarios whose task conflict is a knob (``data.shift``).

MNIST (the shipped ``digits/`` folder) is cut into D disjoint domains (``p0``..``p7``, default 4) that share one
10-class head (domain heterogeneity). In every domain a share ``data.shift`` (0..1) of the 784 pixel positions
is scrambled by that domain's own fixed permutation (the Permuted-MNIST construction of continual learning,
applied to part of the image). At 0 the domains are draws of one distribution; as the share grows they need
increasingly different low-level features from the shared weights. The positions scrambled at a smaller shift
are a subset of those at a larger one, so the levels are nested. Which level has more conflict is decided by
measuring it (``mola conflict``, docs/conflict.md), not by the shift value.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mola.data.config import DataConfig
from mola.data.layouts._common import (
    cap,
    name_seed,
    require_dir,
    resolve_root,
    select_names,
    stratified_split,
)
from mola.data.layouts.digits import LAYOUT, load_mnist, standardized_datasets
from mola.data.registry import SCENARIOS
from mola.tasks import Scenario, TaskInfo

DOMAINS = [f"p{i}" for i in range(8)]
DEFAULT_DOMAINS = DOMAINS[:4]
PIXELS = 28 * 28
TEST_CAP = 1000


def scramble_plan(shift: float, domain: str, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, their new order) of ``domain`` at ``shift``: the first round(shift * 784) positions of one
    seeded order (shared by all domains and levels) are permuted by a seeded per-domain, per-size permutation."""
    if not 0.0 <= shift <= 1.0:
        raise ValueError(f"data.shift must be in [0, 1], got {shift}")
    order = name_seed(split_seed, "shifted_digits/positions").permutation(PIXELS)
    k = int(round(shift * PIXELS))
    pos = order[:k]
    perm = name_seed(split_seed, f"shifted_digits/{domain}/{k}").permutation(k)
    return pos, pos[perm]


def scramble(x: Tensor, shift: float, domain: str, split_seed: int) -> Tensor:
    """``x`` (N, 1, 28, 28) with ``domain``'s scrambled pixels at ``shift`` (a copy)."""
    pos, src = scramble_plan(shift, domain, split_seed)
    flat = x.reshape(len(x), -1).clone()
    if len(pos):
        flat[:, torch.from_numpy(pos)] = flat[:, torch.from_numpy(src)]
    return flat.reshape(x.shape)


@SCENARIOS.register("shifted_digits")
def build_shifted_digits(cfg: DataConfig) -> Scenario:
    """D disjoint MNIST domains, each with its own scramble of a ``cfg.shift`` share of the pixels."""
    root = resolve_root(cfg.root)
    require_dir(root, LAYOUT)
    domains = select_names(cfg.domains, DOMAINS, "shifted_digits domain", root) if cfg.domains else DEFAULT_DOMAINS
    data = load_mnist(root)
    xtr, ytr = data["train"]
    xte, yte = data["test"]
    for split, y in (("train", ytr), ("test", yte)):
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise ValueError(f"shifted_digits MNIST {split}: labels must be 0..9, got {y.min()}..{y.max()}")
    # disjoint pools: every domain's images are its own (slot i of a seeded order, whatever domains are chosen)
    n_slots = len(DOMAINS)
    pool_tr = np.array_split(name_seed(cfg.split_seed, "shifted_digits/train").permutation(len(ytr)), n_slots)
    pool_te = np.array_split(name_seed(cfg.split_seed, "shifted_digits/test").permutation(len(yte)), n_slots)
    parts: dict[str, list[tuple[Tensor, np.ndarray]]] = {"train": [], "val": [], "test": []}
    for d in domains:
        slot = DOMAINS.index(d)
        rng = name_seed(cfg.split_seed, f"shifted_digits/{d}")
        pool = np.sort(pool_tr[slot])
        tr, va, _ = stratified_split(ytr[pool], cfg.val_fraction, 0.0, rng)
        tr, va = cap(pool[tr], cfg.max_per_task, rng), cap(pool[va], cfg.max_eval_per_task, rng)
        te = cap(np.sort(pool_te[slot]), min(TEST_CAP, cfg.max_eval_per_task or TEST_CAP), rng)
        for split, x, y, rows in (("train", xtr, ytr, tr), ("val", xtr, ytr, va), ("test", xte, yte, te)):
            parts[split].append((scramble(x[torch.from_numpy(rows)], cfg.shift, d, cfg.split_seed), y[rows]))
    ds, mean, std = standardized_datasets(parts, cfg)
    channels = cfg.channels or 1
    size = cfg.image_size or 28
    counts = [len(b[1]) for b in parts["train"]]
    return Scenario(
        name="shifted_digits",
        heterogeneity="domain",
        tasks=[TaskInfo(d, "classification", 10) for d in domains],
        train=ds["train"], val=ds["val"], test=ds["test"],
        input_shape=(channels, size, size),
        shared_head=True,
        notes=(f"shifted_digits: {len(domains)} disjoint MNIST domains ({', '.join(map(str, counts))} training "
               f"images), shift {cfg.shift:g} ({int(round(cfg.shift * PIXELS))} of {PIXELS} pixels scrambled per "
               f"domain, split seed {cfg.split_seed}); standardised with the pooled train mean {mean:.4f} / "
               f"std {std:.4f}"),
        extra={"root": str(root), "shift": cfg.shift},
    )
