"""Pruning with second-order information: OBS over M-FAC inverses, and magnitude as baseline.

* :func:`prune_oneshot`: prune a model to a sparsity (or an N:M pattern) in one call, with
  recomputation of gradients and inverse in geometric sub-steps.
* :class:`GradualPruner`: the cubic schedule interleaved with training.
* :class:`Masks`: which weights are kept; ``attach`` keeps pruned weights at zero while training.
* :func:`recalibrate_batchnorm`: re-estimate BatchNorm statistics after pruning.
* :class:`PruneSettings`: the settings of a prune, checked once (``None`` means the default of
  :mod:`mfac.defaults`; ``block_size=mfac.defaults.EXACT`` the exact inverse).
* :class:`RowSharing`: the gradient rows of one inverse shared over a process group.
* Structured pruning: ``prune_oneshot(..., structure="neurons" | "channels" | "heads")`` removes
  whole structures by group OBS; :func:`find_structures` finds them (:class:`StructureGroup`
  describes others) and :func:`compact` rebuilds the pruned layers smaller.
"""

from .batchnorm import recalibrate_batchnorm
from .compact import CompactionResult, compact
from .gradual import GradualPruner
from .masks import MaskHandle, Masks
from .oneshot import prune_oneshot
from .settings import PruneSettings
from .sharing import RowSharing
from .structures import ParamSlice, StructureGroup, find_structures

__all__ = ["prune_oneshot", "GradualPruner", "Masks", "MaskHandle", "recalibrate_batchnorm", "PruneSettings",
           "RowSharing", "compact", "CompactionResult", "find_structures", "StructureGroup", "ParamSlice"]
