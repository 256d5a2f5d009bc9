"""Fisher-inverse objects: the linear algebra of M-FAC, on plain tensors.

All four classes represent F^-1 for F = damp*I + G^T G / m (m = gradients held) and share the
protocol of :class:`FisherInverse` (``ihvp``, ``diag``, ``element``, ``column``, ``dim``,
``num_grads``, ``damp``, ``device``, ``dtype``):

* :class:`DenseFisherInverse`: explicit d x d inverse, the reference for small d.
* :class:`StaticFisherInverse`: exact and matrix-free for a fixed set of gradients.
* :class:`BlockFisherInverse`: block-diagonal approximation for large d (pruning).
* :class:`SlidingWindowFisherInverse`: the last m gradients of a stream (the optimizer).
"""

from .base import FisherInverse, NonFiniteGradientError
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
]
