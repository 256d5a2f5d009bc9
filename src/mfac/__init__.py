"""mfac: M-FAC second-order information for PyTorch.

Gradients flow into a Fisher-inverse object (:mod:`mfac.fisher`), which consumers such as an
optimizer (:mod:`mfac.optim`) or a pruner (:mod:`mfac.prune`) query for products with F^-1.
Importing mfac changes no global setting, and loads torch only when a name that needs it is first
used (so the ``mfac`` command can answer Ctrl-C cleanly even while torch is still loading).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "MFAC": "mfac.optim",
    "FisherInverse": "mfac.fisher",
    "DenseFisherInverse": "mfac.fisher",
    "StaticFisherInverse": "mfac.fisher",
    "BlockFisherInverse": "mfac.fisher",
    "SlidingWindowFisherInverse": "mfac.fisher",
}
_SUBMODULES = {"checkpoint", "cli", "data", "fisher", "grads", "models", "optim", "progress", "prune", "resources",
               "training"}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"mfac.{name}")
    raise AttributeError(f"module 'mfac' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS, *_SUBMODULES])
