"""``--optimizer``: MFAC, Adam or SGD by name. MFAC's window, damping and momentum default to
:data:`mfac.defaults.SMALL_MODEL_RECIPE`, the settings chosen for the built-in models."""

from __future__ import annotations

import torch

from ..defaults import SMALL_MODEL_RECIPE
from ..optim import MFAC
from .errors import CliError

__all__ = ["OPTIMIZERS", "make_optimizer"]

OPTIMIZERS = ("mfac", "adam", "sgd")


def make_optimizer(name: str, params, lr: float, momentum: float = SMALL_MODEL_RECIPE.momentum,
                   weight_decay: float = 0.0, window: int = SMALL_MODEL_RECIPE.window,
                   damp: float = SMALL_MODEL_RECIPE.damp):
    """The optimizer ``name`` over ``params``; ``momentum`` applies to MFAC and SGD, ``window`` and
    ``damp`` to MFAC only."""
    if name == "mfac":
        return MFAC(params, lr=lr, window=window, damp=damp, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise CliError(f"unknown --optimizer {name!r}: use {', '.join(OPTIMIZERS[:-1])} or {OPTIMIZERS[-1]}")
