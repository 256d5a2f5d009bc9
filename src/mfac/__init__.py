"""mfac: M-FAC second-order information for PyTorch.

Gradients flow into a Fisher-inverse object (:mod:`mfac.fisher`), which consumers such as an
optimizer or a pruner query for products with F^-1. Importing mfac changes no global setting.
"""

from .fisher import (
    BlockFisherInverse,
    DenseFisherInverse,
    FisherInverse,
    SlidingWindowFisherInverse,
    StaticFisherInverse,
)
from .optim import MFAC

__version__ = "0.1.0"

__all__ = [
    "MFAC",
    "FisherInverse",
    "DenseFisherInverse",
    "StaticFisherInverse",
    "BlockFisherInverse",
    "SlidingWindowFisherInverse",
    "__version__",
]
