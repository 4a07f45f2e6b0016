"""Distributed data parallel under ``torchrun``: process group, data sharding, loss scaling and reductions.

``mola train`` started by ``torchrun --nproc_per_node=N`` (RANK / WORLD_SIZE / LOCAL_RANK set) runs one process
per rank; the model is wrapped in torch's ``DistributedDataParallel``. The contract is that N processes give
the same update as one process with the same GLOBAL batch (``data.batch_size``):

- every rank draws the same global batch from the seeded sampler and keeps its share (``ShardedBatchSampler``:
  the batch is ordered by task and dealt round-robin, so every rank gets about ``n_t / N`` samples of each task t);
- each task's mean loss is made global (``DistContext.global_losses``): its value is the mean over the global
  batch on every rank, its gradient is the local sum scaled by ``N / global count``, so DDP's gradient average
  equals the single-process gradient of the global mean;
- batch-level terms that need every sample (TwD) read the global rows through ``DistContext.gather_rows``
  (autograd-aware all-gather);
- evaluation shards the split contiguously and merges the metric meters and loss sums.

With one process (no torchrun) every helper is a no-op and ``DistContext.enabled`` is False.
"""

from __future__ import annotations

import atexit
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Sampler

from mola.engine.losses import task_loss_count
from mola.metrics import Meter
from mola.tasks import TaskInfo


def env_world_size() -> int:
    """WORLD_SIZE set by torchrun (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class DistContext:
    """Rank, world size and device of this process plus the collectives the Trainer and methods use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files."""
        return self.rank == 0

    # -- collectives (no-ops with one process) ------------------------------------------------------
    def barrier(self) -> None:
        """Wait for every rank."""
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, x: Tensor) -> Tensor:
        """Sum of ``x`` over ranks (a new tensor; ``x`` is left unchanged)."""
        if not self.enabled:
            return x
        out = x.detach().to(self.device, copy=True).contiguous()
        dist.all_reduce(out)
        return out.to(x.device)

    def broadcast_(self, x: Tensor, src: int = 0) -> Tensor:
        """Overwrite ``x`` in place with rank ``src``'s value; returns ``x``."""
        if self.enabled:
            buf = x.detach().to(self.device).contiguous()
            dist.broadcast(buf, src)
            if buf.data_ptr() != x.data_ptr():
                x.data.copy_(buf)
        return x

    def row_counts(self, n: int) -> list[int]:
        """The number of local rows ``n`` of every rank, in rank order."""
        if not self.enabled:
            return [int(n)]
        counts = torch.tensor([int(n)], dtype=torch.int64, device=self.device)
        out = [torch.zeros_like(counts) for _ in range(self.world_size)]
        dist.all_gather(out, counts)
        return [int(c) for c in out]

    def gather_rows(self, x: Tensor) -> Tensor:
        """Rows of every rank concatenated in rank order (dim 0 may differ by rank); gradients flow back to each
        rank's own rows (summed over the ranks that back-propagate through the result)."""
        if not self.enabled:
            return x
        return _GatherRows.apply(x, self.row_counts(x.shape[0]), self.rank)

    # -- losses and gradients -----------------------------------------------------------------------
    def global_losses(self, losses: dict[int, Tensor], targets: dict[int, Any],
                      tasks: list[TaskInfo]) -> dict[int, Tensor]:
        """Per-task losses of the GLOBAL batch from this rank's per-task mean losses (one all-reduce, one host
        read of its result together with this rank's counts).

        Each returned tensor has the global mean loss as its value (identical on every rank) and, as its
        gradient, the local mean's gradient times ``world_size * local count / global count``: DDP's average
        of these is the single-process gradient of the global mean. Tasks present on another rank only get a
        zero-gradient entry, so every rank sees the same tasks in the same order.
        """
        if not self.enabled:
            return losses
        if not losses:
            raise ValueError(f"rank {self.rank} got a batch without any task loss")
        stats = torch.zeros(4, len(tasks), dtype=torch.float64, device=self.device)
        for k, loss in losses.items():
            n = task_loss_count(tasks[k], targets[k]).to(stats)
            value = loss.detach().to(stats)
            stats[0, k] = n
            stats[1, k] = torch.where(n > 0, value * n, torch.zeros_like(n))  # a mean over nothing adds nothing
            stats[2, k] = 1.0
            stats[3, k] = value
        both = torch.cat([self.all_reduce_sum(stats), stats[:1]]).cpu()  # one host read: global sums, local counts
        stats = both[:4]
        counts = {k: float(n) for k, n in enumerate(both[4].tolist())}
        anchor = next((v for k, v in losses.items() if counts[k] > 0), next(iter(losses.values())))
        out: dict[int, Tensor] = {}
        for k in range(len(tasks)):
            present = float(stats[2, k])
            if present == 0:
                continue
            total = float(stats[0, k])
            value = float(stats[1, k]) / total if total > 0 else float(stats[3, k]) / present
            if k in losses and counts[k] > 0 and total > 0:
                local = losses[k] * (self.world_size * counts[k] / total)
            else:  # absent here (or nothing to average): a zero in the graph, so every rank has the same tasks
                local = anchor * 0.0
            out[k] = (local - local.detach()) + torch.tensor(value, dtype=local.dtype, device=local.device)
        return out

    def average_gradients(self, params: list[Tensor]) -> None:
        """Average ``.grad`` of ``params`` over ranks in one flat all-reduce; a missing grad counts as zero,
        and a parameter without a grad on every rank keeps ``grad = None`` (as one process would)."""
        if not self.enabled or not params:
            return
        ref = params[0]
        flat = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float64)
                for p in params]
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float64, device=ref.device)
        buf = self.all_reduce_sum(torch.cat(flat + [has]))
        used = buf[-len(params):]
        offset = 0
        for p, u in zip(params, used.tolist(), strict=True):
            n = p.numel()
            if u > 0:
                g = (buf[offset:offset + n] / self.world_size).view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.copy_(g)
            offset += n

    # -- evaluation ---------------------------------------------------------------------------------
    def merge_meters(self, meters: list[Meter]) -> list[Meter]:
        """Every rank's metric meters merged by their declared states (``Meter.add_state``), identical on every
        rank: all "sum" states of all meters in one all-reduce, all "cat" states in one gather (concatenated in
        rank order); the inputs are left unchanged."""
        if not self.enabled:
            return meters
        merged = [copy.deepcopy(m) for m in meters]
        sums = [(m, k) for m in merged for k, r in m.reductions().items() if r == "sum"]
        values = [torch.as_tensor(getattr(m, k)) for m, k in sums]
        if values:
            flat = self.all_reduce_sum(torch.cat([v.detach().to("cpu", torch.float64).reshape(-1) for v in values]))
            offset = 0
            for (m, k), v in zip(sums, values, strict=True):
                part = flat[offset:offset + v.numel()].reshape(v.shape).to(v.dtype)
                offset += v.numel()
                old = getattr(m, k)
                setattr(m, k, part.to(old.device) if isinstance(old, Tensor) else type(old)(part.item()))
        cats = [(m, k) for m in merged for k, r in m.reductions().items() if r == "cat"]
        if cats:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, [[t.cpu() for t in getattr(m, k)] for m, k in cats])
            for i, (m, k) in enumerate(cats):
                setattr(m, k, [t for rank in gathered for t in rank[i]])
        return merged


class _GatherRows(torch.autograd.Function):
    """all_gather of rows (padded to the longest rank); backward sums the gradients over ranks (all-reduce)
    and returns this rank's rows, like reduce-scatter, on every backend."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, counts: list[int], rank: int) -> Tensor:
        longest = max(counts)
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: x.shape[0]] = x.detach()
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        ctx.counts, ctx.rank = counts, rank
        return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start:start + ctx.counts[ctx.rank]], None, None


def init_distributed(device: torch.device) -> DistContext:
    """A DistContext from torchrun's environment: with WORLD_SIZE > 1 (or a process group already set up by the
    caller) join the group (gloo on CPU, nccl on CUDA; CUDA ranks use ``cuda:LOCAL_RANK``); else one process.

    The group is created once per process and kept for later Trainers (re-creating it under torchrun's store
    does not work); it is destroyed when the process exits."""
    world = env_world_size()
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistContext(device=device)
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise ValueError(f"WORLD_SIZE={world} but {var} is not set: start distributed runs with torchrun")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_destroy_group)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       device=device)


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class TrainForward(nn.Module):
    """What DDP wraps: the model's forward and its extra loss (``extra_loss(gather=...)``), so that DDP sees
    every parameter a training step uses (TwD reaches the lift only through the extra loss)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, task_ids: Tensor, gather: Any = None) -> tuple[dict[int, Tensor], Tensor | None]:
        outputs = self.model(x, task_ids)
        return outputs, self.model.extra_loss(gather=gather)


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.parallel.DistributedDataParallel:
    """torch DDP around ``TrainForward(model)``; ``find_unused_parameters`` because a rank's share of the batch
    may miss a task (its adapter and head then get no local gradient)."""
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(TrainForward(model), device_ids=ids,
                                               output_device=ids[0] if ids else None, find_unused_parameters=True)


def shard_batch(batch: list[int], task_ids: np.ndarray | None, rank: int, world_size: int) -> list[int]:
    """This rank's share of a global batch: samples ordered by task (stable) and dealt round-robin."""
    if len(batch) < world_size:
        raise ValueError(f"a global batch of {len(batch)} samples cannot be split over {world_size} processes; "
                         f"raise data.batch_size to at least {world_size}")
    idx = np.asarray(batch, dtype=np.int64)
    if task_ids is not None:
        idx = idx[np.argsort(task_ids[idx], kind="stable")]
    return idx[rank::world_size].tolist()


class ShardedBatchSampler(Sampler[list[int]]):
    """Draws each GLOBAL batch from ``batch_sampler`` (the single-process sampler, same seed on every rank) and
    yields this rank's share (``shard_batch``); epochs, state and other attributes go to the wrapped sampler."""

    def __init__(self, batch_sampler: Any, task_ids: np.ndarray | None, rank: int, world_size: int) -> None:
        self.batch_sampler = batch_sampler
        self.task_ids = None if task_ids is None else np.asarray(task_ids)
        self.rank, self.world_size = int(rank), int(world_size)
        self.skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for b, batch in enumerate(self.batch_sampler):
            if b >= skip:
                yield shard_batch(list(batch), self.task_ids, self.rank, self.world_size)

    def skip_next(self, batches: int) -> None:
        """Leave out the first ``batches`` global batches of the next pass (drawn, never loaded): mid-epoch resume."""
        if batches < 0:
            raise ValueError(f"cannot skip a negative number of batches ({batches})")
        self.skip = int(batches)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def _seeded(self) -> Any:
        inner = self.batch_sampler
        return inner if hasattr(inner, "set_epoch") else getattr(inner, "sampler", inner)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass draw the global batches of ``epoch``."""
        self._seeded().set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped seeded sampler's state."""
        return self._seeded().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the wrapped seeded sampler's state."""
        self._seeded().load_state_dict(state)

    def __getattr__(self, name: str) -> Any:
        if name in ("batch_sampler", "skip"):
            raise AttributeError(name)
        return getattr(self.batch_sampler, name)


def _rebuild(loader: DataLoader, batch_sampler: Any) -> DataLoader:
    return DataLoader(loader.dataset, batch_sampler=batch_sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, timeout=loader.timeout,
                      worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context,
                      generator=loader.generator, prefetch_factor=loader.prefetch_factor,
                      persistent_workers=loader.persistent_workers)


def shard_loaders(loaders: dict[str, DataLoader], ctx: DistContext) -> dict[str, DataLoader]:
    """The train loader yields this rank's share of each global batch; eval loaders a contiguous slice of the split."""
    if not ctx.enabled:
        return loaders
    out = dict(loaders)
    train = loaders["train"]
    task_ids = getattr(train.dataset, "task_ids", None)
    out["train"] = _rebuild(train, ShardedBatchSampler(train.batch_sampler, task_ids, ctx.rank, ctx.world_size))
    for split, loader in loaders.items():
        if split == "train":
            continue
        n = len(loader.dataset)
        start, stop = n * ctx.rank // ctx.world_size, n * (ctx.rank + 1) // ctx.world_size
        batch_size = loader.batch_size or 1
        out[split] = _rebuild(loader, BatchSampler(range(start, stop), batch_size, drop_last=False))
    return out


__all__ = ["DistContext", "ShardedBatchSampler", "TrainForward", "env_world_size", "init_distributed", "shard_batch",
           "shard_loaders", "wrap_ddp"]
