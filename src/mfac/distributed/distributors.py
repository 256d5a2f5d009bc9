"""Distributors: how MFAC's one window is laid out over processes, chosen once at construction.

As in Meta's Distributed Shampoo, the optimizer holds one distributor and its ``step`` calls the
same methods whatever the layout; only the distributor knows whether, and how, the window is
sharded. Every distributor answers:

* ``local(p)``: the part of parameter (or gradient) ``p`` this process updates;
* ``window_dim(dim)``: coordinates of the window held here, for ``dim`` local coordinates;
* ``reduce``: the window's sum over shards (None for a whole window);
* ``window_part(flat)``: the part of the flat local gradient that enters this process's window;
* ``full_direction(direction)``: the direction for all local coordinates from this process's part;
* ``agree(flag)``: a boolean scalar that is True on every process only if it is True on all;
* ``fail_together(error, device)``: every process calls it with the outcome of its own checks (an
  exception or None); if any failed, all raise the same exception, before any collective waits;
* ``describe()``: which coordinates this process's state covers (None: all of them), saved in
  ``state_dict`` so a state is loaded where it belongs;
* ``to_checkpoint(local, rows)`` / ``from_checkpoint(tensor)``: window rows (``rows=True``) or the
  momentum vector, between this process's layout and the whole model's flat coordinates, for
  ``torch.distributed.checkpoint`` (:mod:`mfac.distributed.checkpoint`).

:class:`SingleProcess` (no process group), :class:`CoordinateShards` (replicated parameters, as
under DDP: each process keeps 1/world of every window row and the direction is all-gathered),
:class:`ParameterShards` (FSDP2 / HSDP: each process's window covers its own parameter shards).
"""

from __future__ import annotations

import math

import torch

from .collectives import (ParamShards, ShardLayout, all_true, fail_together, gather_over, is_dtensor, local_tensor,
                          sum_over)

__all__ = ["SingleProcess", "CoordinateShards", "ParameterShards", "choose_distributor"]


def _identity(tensor):
    return tensor


class SingleProcess:
    """One process holds the whole window."""

    group = None
    reduce = None
    sharded_params = False
    local = staticmethod(_identity)
    window_part = staticmethod(_identity)
    full_direction = staticmethod(_identity)
    agree = staticmethod(_identity)
    total = None  # each process holds whole parameters: its own sums are the totals

    @staticmethod
    def window_dim(dim: int) -> int:
        return dim

    @staticmethod
    def describe() -> None:
        return None

    def to_checkpoint(self, local: torch.Tensor, rows: bool) -> torch.Tensor:
        return local

    def from_checkpoint(self, tensor) -> torch.Tensor:
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    def fail_together(self, error: BaseException | None, device=None, same: dict | None = None) -> None:
        """Raise ``error`` here, or on every process of the group the first one that failed
        (:func:`mfac.distributed.fail_together`, which also checks that the ``same`` values agree);
        return if none did."""
        if self.group is not None:
            fail_together(error, self.group, device, same)
        elif error is not None:
            raise error


class CoordinateShards(SingleProcess):
    """Replicated parameters (DDP): the window's columns are split over ``group`` by coordinates.
    Each step sends one m-vector all-reduce (inside the window) and one all-gather of the direction."""

    def __init__(self, dim: int, group):
        self.layout = ShardLayout.of(dim, group)
        self.group = group
        self.reduce = sum_over(group)

    def window_dim(self, dim: int) -> int:
        return self.layout.size

    def window_part(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.layout.start: self.layout.stop]

    def full_direction(self, direction: torch.Tensor) -> torch.Tensor:
        return gather_over(direction, self.layout, self.group)

    def describe(self) -> dict:
        return self.layout.as_dict()

    def to_checkpoint(self, local: torch.Tensor, rows: bool) -> torch.Tensor:
        """Rows (m, size) become the (m, d) DTensor sharded on coordinates; the momentum is replicated."""
        if not rows:
            return local
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        layout = self.layout
        mesh = DeviceMesh.from_group(self.group, local.device.type)
        whole = DTensor.from_local(local, mesh, [Shard(1)], run_check=False,
                                   shape=torch.Size((local.shape[0], layout.dim)), stride=(layout.dim, 1))
        chunks = whole.__create_chunk_list__()  # what DCP will record: it must be exactly our slice
        if [(tuple(c.offsets), tuple(c.sizes)) for c in chunks] != [((0, layout.start), tuple(local.shape))]:
            raise RuntimeError(f"DTensor places this shard at {chunks}, not at coordinates "
                               f"[{layout.start}, {layout.stop}); this torch version shards differently")
        return whole


class ParameterShards(SingleProcess):
    """Parameters sharded by FSDP2 (or HSDP): each process's window covers its own shards, the
    window's products reduce over the mesh's shard dimension, nothing is gathered, and every
    process must agree before a step is applied."""

    sharded_params = True

    def __init__(self, params: list, group):
        self.shards, self.group = ParamShards.of(params, group)
        self.reduce = sum_over(self.group)
        self.params = params
        self.local = local_tensor

    def agree(self, flag: torch.Tensor) -> torch.Tensor:
        return all_true(flag, self.group)

    def total(self, partial: torch.Tensor) -> torch.Tensor:
        """A float64 sum over this process's parameter shards, summed over the group."""
        return self.reduce(partial)

    def describe(self) -> dict:
        return self.shards.as_dict()

    def flat_ranges(self) -> list[tuple[int, int]]:
        """Where each parameter's local shard lies in the flat coordinates of the whole model (the
        order of one process's window): one (global offset, length) per parameter. FSDP2 shards
        dimension 0, so a shard is one contiguous range of its flattened parameter."""
        ranges, param_offset = [], 0
        for i, p in enumerate(self.params):
            (chunk,) = p.__create_chunk_list__()
            offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
            if p.dim() == 0 or any(offsets[1:]) or sizes[1:] != tuple(p.shape[1:]):
                raise ValueError(f"parameter {i} is sharded along a dimension other than 0 ({p.placements}); "
                                 f"distributed checkpoints of MFAC need FSDP2's default dimension-0 sharding. Save "
                                 f"each process's optimizer.state_dict() with torch.save instead")
            row = math.prod(p.shape[1:])
            ranges.append((param_offset + offsets[0] * row, sizes[0] * row))
            param_offset += p.numel()
        return ranges

    def to_checkpoint(self, local: torch.Tensor, rows: bool):
        """This process's rows (m, local d), or momentum (local d,), as a DTensor of the whole model's
        shape, (m, d) or (d,), holding one piece per parameter at that parameter's flat coordinates:
        the tensor a DDP or one-process optimizer saves, so checkpoints load across all three forms.
        The pieces sit in torch's LocalShardsWrapper (several shards of one DTensor in one process,
        made for distributed checkpoints); loading writes into them in place."""
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard
        try:
            from torch.distributed.tensor._shards_wrapper import LocalShardsWrapper
        except ImportError:  # torch < 2.5
            raise RuntimeError(f"distributed checkpoints of MFAC over FSDP2-sharded parameters need torch >= 2.5 "
                               f"(this is {torch.__version__}); save each process's optimizer.state_dict() with "
                               f"torch.save instead") from None

        parts, offsets, local_offset = [], [], 0
        lead = local.shape[:-1]
        for global_offset, length in self.flat_ranges():
            if length:
                parts.append(local[..., local_offset:local_offset + length].contiguous())
                offsets.append((*(0 for _ in lead), global_offset))
            local_offset += length
        shape = torch.Size((*lead, sum(p.numel() for p in self.params)))
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        mesh = DeviceMesh.from_group(self.group, local.device.type)
        return DTensor.from_local(LocalShardsWrapper(parts, offsets), mesh, [Shard(len(lead))], run_check=False,
                                  shape=shape, stride=stride)

    def from_checkpoint(self, tensor) -> torch.Tensor:
        """Inverse of :meth:`to_checkpoint`: this process's local rows or vector."""
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if hasattr(local, "local_shards"):
            return torch.cat(local.local_shards(), dim=-1)
        ranges = [r for r in self.flat_ranges() if r[1]]  # a plain tensor of the whole model
        return torch.cat([tensor[..., start:start + length] for start, length in ranges], dim=-1)


def choose_distributor(params: list, process_group, dim: int):
    """The distributor for these parameters: FSDP2 DTensors take :class:`ParameterShards` (over
    their mesh, or ``process_group`` checked against it), a ``process_group`` with plain parameters
    :class:`CoordinateShards`, and otherwise :class:`SingleProcess`."""
    if any(map(is_dtensor, params)):
        return ParameterShards(params, process_group)
    if process_group is not None:
        return CoordinateShards(dim, process_group)
    return SingleProcess()
