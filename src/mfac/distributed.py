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

* :class:`ShardLayout`: which contiguous range of the d coordinates each process holds (torch's
  chunking, the same as a DTensor sharded on that dimension).
* :class:`ParamShards`: parameters that are already sharded (FSDP2's ``fully_shard``, DTensors, on a
  1-D mesh or HSDP's 2-D one): each process's window covers its own parameter shards, the products
  reduce over the shard dimension only, and nothing is gathered.
* :func:`sum_over` / :func:`gather_over`: the two collectives, as plain functions of tensors.
* :func:`get_optimizer_state_dict` / :func:`set_optimizer_state_dict`: MFAC's state for
  ``torch.distributed.checkpoint`` (DCP), with the window rows as one DTensor sharded by coordinates
  (the whole model's, in parameter order, whatever the form), so a checkpoint saved by N processes
  loads into M processes (or one), with DDP or FSDP2, and each reads only its shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["ShardLayout", "ParamShards", "sum_over", "gather_over", "all_true", "get_optimizer_state_dict", "set_optimizer_state_dict"]


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


# Checkpoints with torch.distributed.checkpoint ---------------------------------------------------

def _rows_as_dtensor(rows: torch.Tensor, layout: ShardLayout, group):
    """This process's (m, size) rows as the (m, dim) DTensor sharded on coordinates over ``group``."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = DeviceMesh.from_group(group, rows.device.type)
    whole = DTensor.from_local(rows, mesh, [Shard(1)], run_check=False,
                               shape=torch.Size((rows.shape[0], layout.dim)), stride=(layout.dim, 1))
    chunks = whole.__create_chunk_list__()  # what DCP will record: it must be exactly our slice
    if [(tuple(c.offsets), tuple(c.sizes)) for c in chunks] != [((0, layout.start), tuple(rows.shape))]:
        raise RuntimeError(f"DTensor places this shard at {chunks}, not at coordinates "
                           f"[{layout.start}, {layout.stop}); this torch version shards differently")
    return whole


def _flat_ranges(optimizer) -> list[tuple[int, int]]:
    """FSDP2: where each parameter's local shard lies in the flat coordinates of the whole model (the
    order of one process's window): one (global offset, length) per parameter. FSDP2 shards dimension
    0, so a shard is one contiguous range of its flattened parameter."""
    ranges, param_offset = [], 0
    for i, p in enumerate(optimizer._all_params()):
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


def _as_flat_shards(optimizer, local: torch.Tensor, ranges: list[tuple[int, int]]):
    """FSDP2: this process's window rows (m, local d), or its flat momentum (local d,), as a DTensor
    of the whole model's shape, (m, d) or (d,), holding one piece per parameter at that parameter's
    flat coordinates: the tensor a DDP or one-process optimizer saves, so checkpoints load across all
    three forms. The pieces sit in torch's LocalShardsWrapper (several shards of one DTensor in one
    process, made for distributed checkpoints); loading writes into them in place. ``ranges``: from
    :func:`_flat_ranges`."""
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
    for global_offset, length in ranges:
        if length:
            parts.append(local[..., local_offset:local_offset + length].contiguous())
            offsets.append((*(0 for _ in lead), global_offset))
        local_offset += length
    shape = torch.Size((*lead, sum(p.numel() for p in optimizer._all_params())))
    mesh = DeviceMesh.from_group(optimizer._group, local.device.type)
    return DTensor.from_local(LocalShardsWrapper(parts, offsets), mesh, [Shard(len(lead))], run_check=False,
                              shape=shape, stride=_contiguous_stride(shape))


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, running = [], 1
    for size in reversed(shape):
        stride.append(running)
        running *= size
    return tuple(reversed(stride))


def _from_flat_shards(optimizer, tensor) -> torch.Tensor:
    """Inverse of :func:`_as_flat_shards`: this process's local rows or vector."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    if hasattr(local, "local_shards"):
        return torch.cat(local.local_shards(), dim=-1)
    ranges = [r for r in _flat_ranges(optimizer) if r[1]]  # a plain tensor of the whole model
    return torch.cat([tensor[..., start:start + length] for start, length in ranges], dim=-1)


def get_optimizer_state_dict(optimizer) -> dict:
    """MFAC's state in a form ``torch.distributed.checkpoint`` saves and reshards.

    The same as ``optimizer.state_dict()`` but for the window: its rows are one (m, d) DTensor sharded
    by coordinates over the optimizer's process group (a plain (m, d) tensor in one process), and
    nothing in it names a process. Every process calls it, at once, with the same optimizer settings.
    Before the first step it returns an empty window of the right sizes, which is what
    :func:`set_optimizer_state_dict` needs as a template to load into::

        state = {"model": model.state_dict(), "optim": mfac.distributed.get_optimizer_state_dict(opt)}
        torch.distributed.checkpoint.save(state, checkpoint_id=folder)
        ...                                    # later, with any number of processes
        state = {"model": model.state_dict(), "optim": mfac.distributed.get_optimizer_state_dict(opt)}
        torch.distributed.checkpoint.load(state, checkpoint_id=folder)
        model.load_state_dict(state["model"])
        mfac.distributed.set_optimizer_state_dict(opt, state["optim"])

    Memory: a copy of this process's window rows (m x d / world numbers) while the dict lives.
    Compressed windows (density < 1) run in one process and are returned as in ``state_dict()``.
    Whatever the form (one process, a window sharded under DDP, FSDP2's sharded parameters), the rows
    are saved as the (m, d) tensor of one process's window, d in the order of the parameters, and the
    momentum as its (d,) vector, each process writing the coordinates it holds (with FSDP2 one
    piece per parameter), so a checkpoint loads into any of the three forms, at any
    number of processes.
    """
    from .fisher.window import compute_dtype

    from . import resources

    if optimizer._density < 1:  # the compressed window is copied as it is stored
        rows_bytes = 0 if optimizer.fisher is None else optimizer.fisher.nbytes
    else:
        rows_bytes = optimizer._window_size * optimizer._window_dim * optimizer._storage_dtype().itemsize
    resources.check_fits(2 * rows_bytes if optimizer._param_shards is not None else rows_bytes,
                         optimizer._all_params()[0].device, "a copy of this process's MFAC window for a checkpoint",
                         "save each process's optimizer.state_dict() with torch.save instead, or free memory first")
    state = optimizer.state_dict()
    extra = dict(state["mfac"])
    if getattr(optimizer, "_density", 1.0) < 1:
        return state
    layout = optimizer._layout
    if extra["window"] is None:  # an empty window of the saved sizes: a template to load into
        dtype = optimizer._storage_dtype()
        device = optimizer._all_params()[0].device
        m = optimizer._window_size
        extra["window"] = {"dim": optimizer._window_dim, "window": m, "damp": optimizer._damp,
                           "storage_dtype": str(dtype), "pushed": 0,
                           "grads": torch.zeros(m, optimizer._window_dim, dtype=dtype, device=device),
                           "gram": torch.zeros(m, m, dtype=torch.float64, device=device)}
        if any(group["momentum"] for group in optimizer.param_groups):
            extra["momentum"] = torch.zeros(optimizer.dim, dtype=compute_dtype(dtype), device=device)
    window = dict(extra["window"])
    if optimizer._param_shards is not None:
        ranges = _flat_ranges(optimizer)
        window["grads"] = _as_flat_shards(optimizer, window["grads"], ranges)
        if extra.get("momentum") is not None:
            extra["momentum"] = _as_flat_shards(optimizer, extra["momentum"], ranges)
        window["dim"] = extra["dim"] = sum(p.numel() for p in optimizer._all_params())  # not this shard's
    else:
        if layout is not None:
            window["grads"] = _rows_as_dtensor(window["grads"], layout, optimizer._group)
        window["dim"] = optimizer.dim
    extra["window"], extra["shard"] = window, None
    state["mfac"] = extra
    return state


def set_optimizer_state_dict(optimizer, state: dict) -> None:
    """Load a state from :func:`get_optimizer_state_dict` (after ``torch.distributed.checkpoint.load``
    filled it) into ``optimizer``, which may run on a different number of processes than the one
    that saved it. Every process calls it at once; it is checked as ``MFAC.load_state_dict`` checks a
    state, and a failed load leaves the optimizer unchanged."""
    if not isinstance(state, dict) or not isinstance(state.get("mfac"), dict):
        raise ValueError("state must be the dict from mfac.distributed.get_optimizer_state_dict(), filled by "
                         "torch.distributed.checkpoint.load")
    if getattr(optimizer, "_density", 1.0) < 1:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.tensor import DTensor

    state = dict(state)
    extra = dict(state["mfac"])
    window = dict(extra["window"]) if isinstance(extra.get("window"), dict) else None
    dim = sum(p.numel() for p in optimizer._all_params())  # all processes' coordinates together
    for saved in (extra.get("dim"), None if window is None else window.get("dim")):
        if saved is not None and saved != dim:
            raise ValueError(f"the checkpoint's window has d = {saved!r} coordinates but this optimizer's "
                             f"parameters have d = {dim:,}; load it into an MFAC built on the same model")
    if window is not None:
        rows = window.get("grads")
        if optimizer._param_shards is not None:
            rows = _from_flat_shards(optimizer, rows)
            if extra.get("momentum") is not None:
                extra["momentum"] = _from_flat_shards(optimizer, extra["momentum"])
        elif isinstance(rows, DTensor):
            rows = rows.to_local()
        window["grads"], window["dim"] = rows, optimizer._window_dim
        if extra.get("steps") == 0 and window.get("pushed") == 0:  # saved before the first step
            window = None
            if isinstance(extra.get("momentum"), torch.Tensor) and not extra["momentum"].any():
                extra["momentum"] = None
    extra["window"], extra["dim"], extra["shard"] = window, optimizer.dim, optimizer._shard_description()
    state["mfac"] = extra
    optimizer.load_state_dict(state)
