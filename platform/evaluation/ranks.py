"""Work split over the ranks of a data-parallel evaluation, and gathered back exactly.

Item i (a window, an example) is scored by rank i mod world. Every rank gathers the per-item values of all
ranks and puts them back in item order, so sums are taken in the same order as on one process: the numbers
are the same bits whatever the world size (a reduced sum would depend on it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class Ranks:
    """This process's share of the items and the gathering of per-item results (one process: no-ops)."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size

    @classmethod
    def current(cls) -> Ranks:
        """The ranks of the initialised default process group, or one process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def mine(self, n_items: int) -> list[int]:
        """The items of this rank, in order."""
        return list(range(self.rank, n_items, self.world_size))

    def collect(self, values: Tensor, n_items: int) -> Tensor:
        """values (len(mine(n_items)), ...) of this rank -> (n_items, ...) of every rank, in item order."""
        if self.world_size == 1:
            return values
        per_rank = -(-n_items // self.world_size)  # ceil: ranks with one item fewer pad a zero row
        padded = values.new_zeros((per_rank, *values.shape[1:]))
        padded[: values.shape[0]] = values
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded.contiguous())
        stacked = torch.stack(gathered, dim=1)  # (per_rank, world, ...): item i at [i // world, i % world]
        return stacked.reshape(per_rank * self.world_size, *values.shape[1:])[:n_items]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()
