"""Fisher-inverse objects: the linear algebra of M-FAC, on plain tensors.

All five classes represent F^-1 for F = damp*I + G^T G / m (m = gradients held) and share the
protocol of :class:`FisherInverse` (``ihvp``, ``diag``, ``element``, ``column``, ``dim``,
``num_grads``, ``damp``, ``device``, ``dtype``):

* :class:`DenseFisherInverse`: explicit d x d inverse, the reference for small d.
* :class:`StaticFisherInverse`: exact and matrix-free for a fixed set of gradients.
* :class:`BlockFisherInverse`: block-diagonal approximation for large d (pruning).
* :class:`SlidingWindowFisherInverse`: the last m gradients of a stream (the optimizer).
* :class:`CompressedWindowFisherInverse`: the same over gradients compressed to a fraction of
  their entries with error feedback (EFCP), for windows of 1024 on tens of millions of weights.
"""

from .base import FisherInverse, NonFiniteGradientError
from .compressed import CompressedWindowFisherInverse
from .blocks import BlockFisherInverse, StaticFisherInverse
from .dense import DenseFisherInverse
from .window import SlidingWindowFisherInverse

__all__ = [
    "FisherInverse",
    "NonFiniteGradientError",
    "DenseFisherInverse",
    "StaticFisherInverse",
    "BlockFisherInverse",
    "SlidingWindowFisherInverse",
    "CompressedWindowFisherInverse",
]
