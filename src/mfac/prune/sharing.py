"""Data-parallel OBS: sharing the gradient rows of one inverse over a process group."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["RowSharing"]


@dataclass(frozen=True)
class RowSharing:
    """The ``num_grads`` gradient rows of each inverse, computed by the processes of ``group``
    together: each process computes ``rows`` of them from its own batches (ceil(num_grads /
    world_size) each, the last process the rest), and the block statistics built from them are
    summed over the group (:meth:`sum`), so every process factorises the same inverse."""

    group: object
    world_size: int
    rank: int
    num_grads: int

    @classmethod
    def of(cls, group, num_grads: int) -> "RowSharing":
        """This process's share of ``num_grads`` rows over ``group`` (torch.distributed must be
        initialised). Raises ValueError when some process would compute no row."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("process_group needs torch.distributed to be initialised "
                               "(torch.distributed.init_process_group) before pruning")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        each = -(-num_grads // world)
        if (world - 1) * each >= num_grads:
            raise ValueError(f"cannot share num_grads={num_grads} gradient rows over {world} processes: each computes "
                             f"{each} rows and the last the rest, which leaves the last none; raise num_grads (a "
                             f"multiple of {world} shares the samples evenly) or use fewer processes")
        return cls(group, world, rank, num_grads)

    @property
    def rows(self) -> int:
        """Gradient rows (mini-batch gradients, or samples with per_sample) this process computes."""
        each = -(-self.num_grads // self.world_size)
        return min(self.num_grads, (self.rank + 1) * each) - min(self.num_grads, self.rank * each)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the group in place and return it (the reduction hook of
        :meth:`mfac.fisher.BlockFisherInverse.from_chunks`)."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor
