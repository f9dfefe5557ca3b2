"""Many processes: ``torchrun`` sets the environment, this module reads it.

``torchrun --nproc_per_node=4 -m spherical_channels.cli train config.yaml`` (or the ``scn``
entry point) starts one process per GPU (or per CPU share); ``--nnodes`` with a rendezvous
endpoint spans several machines in the same way. Each process trains on its shard of every
epoch (:class:`ShardedSampler`), gradients are averaged by DistributedDataParallel, and metrics
are summed over ranks before they are reported.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "DistributedContext",
    "ShardedSampler",
    "all_gather_object",
    "all_reduce_max",
    "all_reduce_sum",
    "broadcast_object",
    "init_distributed",
]


@dataclass
class DistributedContext:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group. All ranks meet first: a gloo rank that tears its group down
        while a peer still has collectives in flight aborts the whole run."""
        if self.distributed and dist.is_initialized():
            self.barrier()
            dist.destroy_process_group()


def init_distributed(device: str = "auto") -> DistributedContext:
    """Join the process group described by ``torchrun``'s environment variables, if any.

    Args:
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. In a
            multi-process CUDA run each process uses ``cuda:LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but CUDA is not available")
    if device == "cuda":
        device = f"cuda:{local_rank}" if world_size > 1 else "cuda"
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch_device.type == "cuda" else "gloo")
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def all_reduce_sum(values: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """Sum of ``values`` over all ranks, on this process's device (a copy)."""
    values = values.detach().to(ctx.device, copy=True)
    if ctx.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_max(values: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """Element-wise maximum of ``values`` over all ranks, on this process's device (a copy)."""
    values = values.detach().to(ctx.device, copy=True)
    if ctx.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def all_gather_object(obj: object, ctx: DistributedContext) -> list:
    """Every rank's ``obj``, in rank order."""
    if not ctx.distributed:
        return [obj]
    gathered: list = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: object, ctx: DistributedContext) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class ShardedSampler(Sampler[int]):
    """This rank's share of a shuffled epoch, resumable mid-epoch.

    The epoch's order is a permutation drawn from ``seed + epoch`` alone, padded (by
    repeating its start) to a multiple of ``world_size`` and dealt round-robin, so every rank
    gets the same number of samples and a run's order does not depend on anything but the
    seed. ``set_epoch(epoch, start)`` skips the first ``start`` samples of this rank's share
    (used when resuming from a checkpoint taken in the middle of an epoch).
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0) -> None:
        if size < 1:
            raise ValueError("cannot sample from an empty data set")
        self.size, self.rank, self.world_size = size, rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(size / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        padded = (order * math.ceil(self.per_rank * self.world_size / self.size))[: self.per_rank * self.world_size]
        mine = padded[self.rank :: self.world_size]
        return iter(mine[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start
