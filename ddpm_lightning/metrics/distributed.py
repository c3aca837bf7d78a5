"""Sharding evaluation work over torch.distributed ranks (Lightning's DDP, Fabric, or none)."""

from __future__ import annotations

from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one.

    Read from torch.distributed rather than passed in, so that the shards always agree with the group
    that torchmetrics all-reduces over.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(num_items: int, rank: int, world_size: int) -> range:
    """The contiguous slice of range(num_items) that `rank` handles; the slices tile it exactly."""
    return range(rank * num_items // world_size, (rank + 1) * num_items // world_size)


def broadcast_from_rank_zero(obj: T) -> T:
    """Rank 0's obj on every rank (a collective: every rank must call it)."""
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return obj
    holder: list[Any] = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
