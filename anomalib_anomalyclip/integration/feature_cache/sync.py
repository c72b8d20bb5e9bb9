"""The processes that share one cache, and how they synchronise.

Multi-process DDP on one machine: the ranks share one memory-mapped file. Rows are
assigned by the sorted image list, the same on every rank; a rank that misses an image
(with a shuffling sampler a rank sees different images every epoch) computes and writes
its row. After each epoch (at the start of the next one, over a gloo process group of
the cache's own) the ranks sum which rows they wrote and their checksums: a row written
by exactly one rank becomes available to all ranks, a row written by two (the sampler's
padding repeats a few images) is dropped and recomputed later. The ranks use rank 0's
folder. With several nodes, or without torch.distributed, every rank keeps a private
cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["RankSync", "distributed_sync"]


def _nothing() -> None:
    """Barrier of a single process."""


def _same(value: Any) -> Any:
    """Sum over, or rank 0's value of, a single process."""
    return value


@dataclass(frozen=True)
class RankSync:
    """The processes that share one cache, and how they synchronise.

    Attributes:
        rank: this process's rank among those sharing the cache.
        world_size: number of processes sharing the cache.
        barrier: waits for all of them.
        sum: element-wise sum of a CPU tensor over all of them (returns a CPU tensor).
        share: rank 0's value of a picklable object.
        release: frees the synchronisation's resources (called once, by every process).
    """

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = _nothing
    sum: Callable[[torch.Tensor], torch.Tensor] = _same
    share: Callable[[Any], Any] = _same
    release: Callable[[], None] = _nothing

    @property
    def is_main(self) -> bool:
        """Whether this process writes the shared index."""
        return self.rank == 0


def distributed_sync() -> RankSync | None:
    """Synchronisation over a gloo process group of the cache's own, ``None`` without torch.distributed.

    Not over Lightning's default group: callbacks such as the progress bar run collectives
    on rank 0 alone (syncing logged metrics early), so a collective of ours on that group
    could pair with a different collective on another rank.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.is_gloo_available()):
        return None
    group = dist.new_group(backend="gloo")

    def total(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    def share(value: Any) -> Any:
        objects = [value]
        dist.broadcast_object_list(objects, src=0, group=group)
        return objects[0]

    return RankSync(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        barrier=lambda: dist.barrier(group=group),
        sum=total,
        share=share,
        release=lambda: dist.destroy_process_group(group),
    )
