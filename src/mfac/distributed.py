"""torch.distributed for mfac: one window sharded by coordinates over the processes of a group.

This module owns process groups and collectives; the linear algebra (:mod:`mfac.fisher`) sees only
its shard of the coordinates and a reduction hook. Every row of the window splits by coordinates,
and every product the algorithm needs reduces to small vectors:

* G x is the sum of the shards' partial products: one all-reduce of an m-vector of float64 per
  push (the new row of the Gram matrix), plus one 8-byte flag so all shards agree on a refusal;
* G^T a is computed shard by shard, giving each shard its slice of F^-1 g;
* under data parallelism (parameters replicated, as with DDP) the slices are all-gathered into the
  full direction: d numbers in all.

So a step sends about 8 m + 4 d bytes per process (float32 parameters) against m d numbers held
by each process / world size: the window's memory divides by the number of processes.

* :class:`ShardLayout`: which contiguous range of the d coordinates each process holds.
* :func:`sum_over` / :func:`gather_over`: the two collectives, as plain functions of tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["ShardLayout", "sum_over", "gather_over"]


@dataclass(frozen=True)
class ShardLayout:
    """Coordinates [start, stop) of ``dim`` held by ``rank`` of ``world_size`` processes: contiguous,
    sizes differing by at most one."""

    dim: int
    world_size: int
    rank: int

    @classmethod
    def of(cls, dim: int, group) -> "ShardLayout":
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("process_group needs torch.distributed to be initialised "
                               "(torch.distributed.init_process_group) before the optimizer is built")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if dim < world:
            raise ValueError(f"cannot shard {dim} coordinates over {world} processes; use fewer processes")
        return cls(dim, world, rank)

    def bounds(self, rank: int | None = None) -> tuple[int, int]:
        rank = self.rank if rank is None else rank
        return self.dim * rank // self.world_size, self.dim * (rank + 1) // self.world_size

    @property
    def start(self) -> int:
        return self.bounds()[0]

    @property
    def stop(self) -> int:
        return self.bounds()[1]

    @property
    def size(self) -> int:
        return self.stop - self.start

    def as_dict(self) -> dict:
        return {"dim": self.dim, "world_size": self.world_size, "rank": self.rank, "start": self.start,
                "stop": self.stop}


def sum_over(group):
    """A reduction hook for a sharded window: sums a tensor over ``group`` in place and returns it."""
    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor
    return reduce


def gather_over(local: torch.Tensor, layout: ShardLayout, group) -> torch.Tensor:
    """The full (dim,) vector from every process's (size,) slice, in coordinate order."""
    widest = max(layout.bounds(r)[1] - layout.bounds(r)[0] for r in range(layout.world_size))
    padded = torch.zeros(widest, dtype=local.dtype, device=local.device)
    padded[: local.numel()] = local
    parts = [torch.empty_like(padded) for _ in range(layout.world_size)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[: stop - start] for part, (start, stop) in
                      zip(parts, (layout.bounds(r) for r in range(layout.world_size)))])
