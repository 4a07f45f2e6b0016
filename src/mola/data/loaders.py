"""DataLoaders for a Scenario: seeded, resumable train sampling ("mixed" or "balanced") and ordered eval.

Reproducibility and resuming: the train order of epoch ``e`` depends only on ``(seed, e)``: every sampler
draws it from a ``torch.Generator`` seeded with ``epoch_seed(seed, e)``. Samplers count epochs themselves
(each new pass over the loader is the next epoch), and ``set_loader_epoch(loader, e)`` (or
``loader.sampler.set_epoch(e)`` / ``loader.batch_sampler.set_epoch(e)``) jumps to epoch ``e``; so a run
resumed at epoch ``e`` that calls it sees exactly the batches an uninterrupted run would. ``state_dict()`` /
``load_state_dict()`` on the sampler save and restore ``{"seed", "epoch"}``. ``set_loader_position(loader, e, k)``
also makes the next pass start at batch ``k`` of epoch ``e`` (a mid-epoch resume) without loading batches 0..k-1.

- ``mixed``: a random permutation of the whole train set per epoch; batches mix tasks in proportion to their
  sizes; ``len(train) // batch_size`` full batches per epoch (the remainder is dropped, so no batch of one
  reaches BatchNorm; when the train set is smaller than one batch it is a single smaller batch).
- ``balanced``: every batch takes ``batch_size // T`` samples from each of the T tasks (the remaining
  ``batch_size % T`` go to randomly chosen tasks), drawn without replacement from per-task permutations that
  are redrawn when used up (small tasks are oversampled, large ones subsampled); ``len(train) // batch_size``
  batches per epoch. Single-input scenarios (every sample carries every task) fall back to ``mixed``.

Eval loaders ("val", "test") keep dataset order, batch ``cfg.eval_batch_size``, and never drop samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from mola.data.config import DataConfig
from mola.tasks import Scenario, TaskDataset

SAMPLING = ("mixed", "balanced")


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed for ``(seed, epoch)`` (collision-free mixing via numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


class _EpochSeeded:
    """Shared epoch bookkeeping: ``epoch`` is the epoch the next pass will draw."""

    seed: int
    epoch: int
    skip: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass draw the order of ``epoch``."""
        self.epoch = int(epoch)

    def skip_next(self, items: int) -> None:
        """Make the next pass (only) leave out its first ``items`` items (indices, or batches for a batch
        sampler) without changing what follows them: how a run resumed mid-epoch skips the batches it saw."""
        if items < 0:
            raise ValueError(f"cannot skip a negative number of items ({items})")
        self.skip = int(items)

    def _take_skip(self) -> int:
        skip, self.skip = self.skip, 0
        return skip

    def state_dict(self) -> dict[str, int]:
        """``{"seed", "epoch"}``: enough to reproduce the next pass."""
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore what ``state_dict`` returned."""
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])

    def _next_generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(epoch_seed(self.seed, self.epoch))
        self.epoch += 1
        return g


class EpochRandomSampler(_EpochSeeded, Sampler[int]):
    """A random permutation of ``range(n)`` per epoch, determined by ``(seed, epoch)``."""

    def __init__(self, n: int, seed: int, epoch: int = 0) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = self._next_generator()
        return iter(torch.randperm(self.n, generator=g)[self._take_skip():].tolist())

    def __len__(self) -> int:
        return self.n


class BalancedBatchSampler(_EpochSeeded, Sampler[list[int]]):
    """Batches of about ``batch_size / T`` samples per task; ``len(task_ids) // batch_size`` per epoch."""

    def __init__(
        self, task_ids: np.ndarray, batch_size: int, seed: int, num_batches: int | None = None, epoch: int = 0
    ) -> None:
        task_ids = np.asarray(task_ids)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        tasks = [t for t in np.unique(task_ids) if t >= 0]
        if not tasks:
            raise ValueError("balanced sampling needs samples with task ids >= 0 (got none)")
        self.pools = [torch.from_numpy(np.flatnonzero(task_ids == t)) for t in tasks]
        self.batch_size, self.seed, self.epoch = int(batch_size), int(seed), int(epoch)
        self.num_batches = num_batches if num_batches is not None else max(1, len(task_ids) // batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        g = self._next_generator()
        skip = self._take_skip()
        t_count = len(self.pools)
        queues = [torch.randperm(len(p), generator=g) for p in self.pools]
        pos = [0] * t_count
        base, rem = divmod(self.batch_size, t_count)
        for b in range(self.num_batches):
            quota = [base] * t_count
            for t in torch.randperm(t_count, generator=g)[:rem].tolist():
                quota[t] += 1
            batch: list[torch.Tensor] = []
            for t, k in enumerate(quota):
                while k > 0:
                    if pos[t] >= len(queues[t]):
                        queues[t], pos[t] = torch.randperm(len(self.pools[t]), generator=g), 0
                    take = queues[t][pos[t]:pos[t] + k]
                    pos[t] += len(take)
                    k -= len(take)
                    batch.append(self.pools[t][take])
            idx = torch.cat(batch)
            order = torch.randperm(len(idx), generator=g)  # drawn for skipped batches too: same later batches
            if b >= skip:
                yield idx[order].tolist()


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on the loader's seeded sampler or batch sampler (no-op for eval loaders)."""
    for s in (loader.batch_sampler, getattr(loader.batch_sampler, "sampler", None), loader.sampler):
        if hasattr(s, "set_epoch"):
            s.set_epoch(epoch)
            return


def set_loader_position(loader: DataLoader, epoch: int, batches_done: int = 0) -> None:
    """Make the next pass over the train ``loader`` yield epoch ``epoch`` from its batch ``batches_done`` on.

    The skipped batches are never loaded: the seeded sampler draws the epoch's whole order and leaves out the
    first ``batches_done`` batches' indices (so the batches that follow are exactly those of a full pass)."""
    set_loader_epoch(loader, epoch)
    if batches_done <= 0:
        return
    batch_sampler = loader.batch_sampler
    if isinstance(batch_sampler, _EpochSeeded) or hasattr(batch_sampler, "skip_next"):  # also DDP's sharded one
        batch_sampler.skip_next(batches_done)
    elif isinstance(loader.sampler, _EpochSeeded) and loader.batch_size is not None:
        loader.sampler.skip_next(batches_done * loader.batch_size)
    else:
        raise ValueError(f"cannot resume mid-epoch: the train loader's sampler ({type(loader.sampler).__name__}) "
                         "is not a mola seeded sampler")


def make_loaders(scenario: Scenario, cfg: DataConfig, seed: int) -> dict[str, DataLoader]:
    """Build the "train" (seeded; ``cfg.sampling``), "val" and "test" (ordered) DataLoaders of a Scenario."""
    if cfg.sampling not in SAMPLING:
        raise ValueError(f"unknown data.sampling {cfg.sampling!r}; accepted: {', '.join(SAMPLING)}")
    if cfg.batch_size < 1 or cfg.eval_batch_size < 1:
        raise ValueError(f"batch sizes must be >= 1, got {cfg.batch_size} / {cfg.eval_batch_size}")
    common: dict[str, Any] = {"num_workers": cfg.num_workers, "persistent_workers": cfg.num_workers > 0}
    worker_gen = torch.Generator()  # only seeds DataLoader workers (augmentation randomness), not the order
    worker_gen.manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)
    train: TaskDataset = scenario.train
    if cfg.sampling == "balanced" and scenario.heterogeneity != "single_input":
        bs = BalancedBatchSampler(train.task_ids, cfg.batch_size, seed)
        train_loader = DataLoader(train, batch_sampler=bs, generator=worker_gen, **common)
    else:
        sampler = EpochRandomSampler(len(train), seed)
        train_loader = DataLoader(
            train, batch_size=cfg.batch_size, sampler=sampler, drop_last=len(train) > cfg.batch_size,
            generator=worker_gen, **common,
        )
    out = {"train": train_loader}
    for split in ("val", "test"):
        out[split] = make_eval_loader(getattr(scenario, split), cfg)
    return out


def make_eval_loader(dataset: TaskDataset, cfg: DataConfig) -> DataLoader:
    """An ordered loader over ``dataset`` with ``cfg.eval_batch_size`` (val/test evaluation). Its own generator
    keeps evaluation off the global RNG: a DataLoader iterator otherwise draws its base seed from it, so how
    often a run evaluates would change the dropout masks of the next training epoch."""
    return DataLoader(dataset, batch_size=cfg.eval_batch_size, shuffle=False, drop_last=False,
                      num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                      generator=torch.Generator().manual_seed(0))
