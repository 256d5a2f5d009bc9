"""torch.distributed for mfac: one window sharded over the processes of a group.

This package owns process groups and collectives; the linear algebra (:mod:`mfac.fisher`) sees only
its shard of the coordinates and a reduction hook. Every row of the window splits by coordinates,
and every product the algorithm needs reduces to small vectors:

* G x is the sum of the shards' partial products: one all-reduce of an m-vector of float64 per
  push (the new row of the Gram matrix), plus one 8-byte flag so all shards agree on a refusal;
* G^T a is computed shard by shard, giving each shard its slice of F^-1 g;
* under data parallelism (parameters replicated, as with DDP) the slices are all-gathered into the
  full direction: d numbers in all.

So a step sends about 8 m + 4 d bytes per process (float32 parameters) against m d numbers held
by each process / world size: the window's memory divides by the number of processes.

* :mod:`~mfac.distributed.distributors`: the layout MFAC picks once at construction
  (:class:`SingleProcess`, :class:`CoordinateShards` for DDP, :class:`ParameterShards` for FSDP2/HSDP).
* :mod:`~mfac.distributed.collectives`: :class:`ShardLayout`, :class:`ParamShards` and the
  collectives as plain functions of tensors, with :func:`fail_together`: a check that fails on one
  process fails on all of them, with the same message, before any collective waits.
* :func:`get_optimizer_state_dict` / :func:`set_optimizer_state_dict`: MFAC's state for
  ``torch.distributed.checkpoint`` (DCP): a checkpoint saved by N processes loads into M processes
  (or one), with DDP or FSDP2, and each reads only its shard.
"""

from .checkpoint import get_optimizer_state_dict, set_optimizer_state_dict
from .collectives import (ParamShards, ShardLayout, SumOver, all_true, fail_together, gather_over, is_dtensor,
                          local_tensor, sum_over)
from .distributors import CoordinateShards, ParameterShards, SingleProcess, choose_distributor

__all__ = ["ShardLayout", "ParamShards", "SumOver", "sum_over", "gather_over", "all_true", "fail_together",
           "is_dtensor", "local_tensor",
           "get_optimizer_state_dict", "set_optimizer_state_dict", "SingleProcess", "CoordinateShards",
           "ParameterShards", "choose_distributor"]
