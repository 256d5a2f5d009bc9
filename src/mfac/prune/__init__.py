"""Pruning with second-order information: OBS over M-FAC inverses, and magnitude as baseline.

* :func:`prune_oneshot`: prune a model to a sparsity (or an N:M pattern) in one call, with
  recomputation of gradients and inverse in geometric sub-steps.
* :class:`GradualPruner`: the cubic schedule interleaved with training.
* :class:`Masks`: which weights are kept; ``attach`` keeps pruned weights at zero while training.
* :func:`recalibrate_batchnorm`: re-estimate BatchNorm statistics after pruning.
"""

from .batchnorm import recalibrate_batchnorm
from .gradual import GradualPruner
from .masks import MaskHandle, Masks
from .oneshot import prune_oneshot

__all__ = ["prune_oneshot", "GradualPruner", "Masks", "MaskHandle", "recalibrate_batchnorm"]
