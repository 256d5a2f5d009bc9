"""Process layouts and the collectives a sharded window needs, as plain functions of tensors.

* :class:`ShardLayout`: which contiguous range of the d coordinates each process holds (torch's
  chunking, the same as a DTensor sharded on that dimension).
* :class:`ParamShards`: parameters that are already sharded (FSDP2's ``fully_shard``, DTensors, on a
  1-D mesh or HSDP's 2-D one).
* :func:`sum_over`, :func:`gather_over`, :func:`all_true`: the collectives.
* :func:`fail_together`: a failure on one process becomes the same failure on all of them, before
  any of them waits in a collective that the failed one will never join.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["ShardLayout", "ParamShards", "SumOver", "sum_over", "gather_over", "all_true", "fail_together",
           "is_dtensor", "local_tensor", "MESSAGE_BYTES"]

MESSAGE_BYTES = 4096  # of the failing process's message sent to the others (UTF-8, truncated beyond)
# Exception types kept across processes (the first that matches; any other becomes RuntimeError).
_KINDS = (ValueError, TypeError, IndexError, KeyError, MemoryError, RuntimeError)


@dataclass(frozen=True)
class ShardLayout:
    """Coordinates [start, stop) of ``dim`` held by ``rank`` of ``world_size`` processes: contiguous
    chunks of ceil(dim / world_size), the last one shorter, as ``torch.chunk`` and DTensor's ``Shard``
    split a dimension (so a checkpoint's shards line up with DCP's)."""

    dim: int
    world_size: int
    rank: int

    @classmethod
    def of(cls, dim: int, group) -> "ShardLayout":
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("process_group needs torch.distributed to be initialised "
                               "(torch.distributed.init_process_group) before the optimizer is built")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if (world - 1) * -(-dim // world) >= dim:
            raise ValueError(f"cannot split {dim} coordinates over {world} processes so that each holds some "
                             f"(chunks of {-(-dim // world)}); use fewer processes")
        return cls(dim, world, rank)

    def bounds(self, rank: int | None = None) -> tuple[int, int]:
        rank = self.rank if rank is None else rank
        chunk = -(-self.dim // self.world_size)
        return min(self.dim, rank * chunk), min(self.dim, (rank + 1) * chunk)

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


@dataclass(frozen=True)
class ParamShards:
    """Parameters sharded by FSDP2 (DTensors with ``Shard`` placements on a one-dimensional mesh): this
    process's window holds the coordinates of its local shards, in parameter order. Any partition of
    the coordinates gives the same products once partial dot products are summed over the group, so
    nothing else changes, and the direction needs no gathering: each process updates its own shards."""

    world_size: int
    rank: int
    replicas: int = 1

    @classmethod
    def of(cls, params: list, group) -> tuple["ParamShards", object]:
        """Check that every parameter is a DTensor sharded over the same device mesh, either one-dimensional
        (FSDP2) or two-dimensional with replicas on the first dimension and shards on the second (HSDP);
        returns the layout and the process group of the shard dimension (``group`` when given, checked
        against it). Under HSDP every replica group runs the same window on identical gradients (FSDP2
        all-reduces them over the replicas), so the window's products reduce over the shards only."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        plain = [i for i, p in enumerate(params) if not isinstance(p, DTensor)]
        if plain:
            raise ValueError(f"MFAC got both DTensor parameters (FSDP2) and plain ones (positions {plain[:5]}); "
                             f"shard the whole model with fully_shard, or none of it")
        meshes = {id(p.device_mesh): p.device_mesh for p in params}
        mesh = params[0].device_mesh
        if len(meshes) > 1 or mesh.ndim not in (1, 2):
            raise ValueError("MFAC supports parameters sharded over one device mesh, one-dimensional (FSDP2 "
                             "fully_shard) or two-dimensional with replicas then shards (HSDP); got several meshes "
                             f"or a {mesh.ndim}-dimensional one")
        for i, p in enumerate(params):
            *replicated, sharded = p.placements
            if not isinstance(sharded, Shard) or not all(isinstance(r, Replicate) for r in replicated):
                raise ValueError(f"parameter {i} is placed as {p.placements}, not sharded: a replicated DTensor "
                                 f"would enter the window once per process. Use fully_shard (Shard placements; "
                                 f"with a 2-D mesh, HSDP's (Replicate(), Shard(0)))")
        shard_group = mesh.get_group(mesh.ndim - 1)
        replicas = mesh.size(0) if mesh.ndim == 2 else 1
        if group is not None and dist.get_world_size(group) != dist.get_world_size(shard_group):
            raise ValueError(f"process_group has {dist.get_world_size(group)} processes but the parameters are "
                             f"sharded over {dist.get_world_size(shard_group)}; pass process_group=None to use the "
                             f"parameters' mesh")
        return cls(dist.get_world_size(shard_group), dist.get_rank(shard_group), replicas), shard_group

    def as_dict(self) -> dict:
        described = {"params": "sharded", "world_size": self.world_size, "rank": self.rank}
        return described if self.replicas == 1 else {**described, "replicas": self.replicas}


def is_dtensor(tensor) -> bool:
    """A DTensor (FSDP2's parameters), recognised without importing torch.distributed.tensor."""
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "to_local")


def local_tensor(tensor):
    """A DTensor's local shard (a view: writing to it writes the parameter); other tensors as they are."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def all_true(flag: torch.Tensor, group) -> torch.Tensor:
    """A boolean scalar that is True on every process of ``group`` only if it is True on all of them."""
    as_int = flag.to(torch.int32).reshape(1)
    dist.all_reduce(as_int, op=dist.ReduceOp.MIN, group=group)
    return as_int[0].bool()


class SumOver:
    """The reduction hook of a sharded window over ``group``: calling it sums a tensor over the group
    in place and returns it; :meth:`agree` turns one process's failure into the same failure on all
    (the window calls it around every check that could fail on one process only)."""

    def __init__(self, group):
        self.group = group

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def agree(self, error: BaseException | None, device=None, same: dict | None = None) -> None:
        fail_together(error, self.group, device, same)


def sum_over(group) -> SumOver:
    """A reduction hook for a sharded window: sums a tensor over ``group`` in place and returns it."""
    return SumOver(group)


def fail_together(error: BaseException | None, group, device=None, same: dict | None = None) -> None:
    """Every process of ``group`` calls this at once with the outcome of its own checks: the exception
    it raised, or None. If any process failed, every process raises the same exception: the type and
    message of the lowest-ranked one that failed, as ``"process r of n: message"`` (chained to the
    original where it happened). ``same`` ({name: int}, the same names on every process, whatever
    its outcome) are values every process must hold alike; if they differ (and nothing failed),
    every process raises ValueError naming them. Otherwise it
    returns. Cost: one all-reduce of a few integers, and one of 4 KB when something failed.
    ``device``: where the collective's tensors live (a CUDA device for NCCL; default CPU)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    values = [int(v) for v in (same or {}).values()]
    flags = torch.tensor([rank if error is not None else world, *values, *(-v for v in values)], dtype=torch.int64,
                         device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)
    source = int(flags[0])
    if source < world:
        message = torch.zeros(MESSAGE_BYTES + 1, dtype=torch.int32, device=device)
        if rank == source:
            kind = next((i for i, k in enumerate(_KINDS) if isinstance(error, k)), len(_KINDS) - 1)
            text = (str(error) or type(error).__name__).encode()[:MESSAGE_BYTES]
            message[0] = kind
            message[1:1 + len(text)] = torch.tensor(list(text), dtype=torch.int32, device=device)
        dist.all_reduce(message, op=dist.ReduceOp.SUM, group=group)
        codes = message.tolist()
        text = bytes(c for c in codes[1:] if c).decode(errors="replace")
        raise _KINDS[codes[0]](f"process {source} of {world}: {text}") from error
    lowest, highest = flags[1:1 + len(values)].tolist(), [-v for v in flags[1 + len(values):].tolist()]
    differ = [f"{name} from {low} to {high}" for name, low, high in zip(same or {}, lowest, highest) if low != high]
    if differ:
        raise ValueError(f"the processes of the group disagree: {', '.join(differ)}; every process must load the "
                         f"state saved by the same run at the same step")


def gather_over(local: torch.Tensor, layout: ShardLayout, group) -> torch.Tensor:
    """The full (dim,) vector from every process's (size,) slice, in coordinate order."""
    widest = max(layout.bounds(r)[1] - layout.bounds(r)[0] for r in range(layout.world_size))
    padded = torch.zeros(widest, dtype=local.dtype, device=local.device)
    padded[: local.numel()] = local
    parts = [torch.empty_like(padded) for _ in range(layout.world_size)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[: stop - start] for part, (start, stop) in
                      zip(parts, (layout.bounds(r) for r in range(layout.world_size)))])
