"""``--optimizer``: MFAC, Adam or SGD by name, with MFAC's settings from the model's recipe.

Every MFAC setting the user leaves out (``--lr``, ``--momentum``, ``--window``, ``--damp``,
``--density``, ``--window-dtype``, ``--max-grad-norm``) comes from :data:`mfac.defaults.SMALL_MODEL_RECIPE` for the
built-in models and from :data:`mfac.defaults.TRANSFORMER_RECIPE` for ``hf:`` models (a compressed
bfloat16 window); ``mfac prune --gradual`` takes its learning rate from
:data:`mfac.defaults.GRADUAL_LR` on built-in models."""

from __future__ import annotations

import torch

from ..defaults import GRADUAL_LR, SMALL_MODEL_RECIPE, TRANSFORMER_RECIPE, OptimizerRecipe
from ..optim import MFAC
from .errors import CliError

__all__ = ["OPTIMIZERS", "DTYPES", "make_optimizer", "recipe_for", "fill_recipe", "gradual_settings", "dtype_name"]

OPTIMIZERS = ("mfac", "adam", "sgd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MFAC_SETTINGS = ("lr", "momentum", "window", "damp", "density", "window_dtype", "max_grad_norm")


def dtype_name(dtype: torch.dtype | None) -> str:
    """``--window-dtype``'s spelling of a recipe's window dtype (None: float32)."""
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def recipe_for(model: str) -> OptimizerRecipe:
    """The recipe of ``--model``: the transformer recipe for ``hf:`` models, else the small-model one."""
    return TRANSFORMER_RECIPE if model.startswith("hf:") else SMALL_MODEL_RECIPE


def fill_recipe(args) -> None:
    """Set every MFAC setting of ``mfac train`` that the user left out (None) from the model's recipe."""
    recipe = recipe_for(args.model)
    for key in MFAC_SETTINGS:
        if getattr(args, key) is None:
            value = getattr(recipe, key)
            setattr(args, key, dtype_name(value) if key == "window_dtype" else
                    (value or 0.0) if key == "max_grad_norm" else value)


def gradual_settings(args) -> dict:
    """The optimizer settings of ``mfac prune --gradual`` (its --lr, --density and --window-dtype,
    the rest from the model's recipe), as keyword arguments of :func:`make_optimizer`."""
    recipe = recipe_for(args.model)
    hf = args.model.startswith("hf:")
    return {"lr": args.lr if args.lr is not None else (recipe.lr if hf else GRADUAL_LR),
            "momentum": recipe.momentum, "window": recipe.window, "damp": recipe.damp,
            "density": args.density if args.density is not None else recipe.density,
            "window_dtype": args.window_dtype or dtype_name(recipe.window_dtype),
            "max_grad_norm": args.max_grad_norm if args.max_grad_norm is not None else (recipe.max_grad_norm or 0.0)}


def make_optimizer(name: str, params, lr: float, momentum: float = SMALL_MODEL_RECIPE.momentum,
                   weight_decay: float = 0.0, window: int = SMALL_MODEL_RECIPE.window,
                   damp: float = SMALL_MODEL_RECIPE.damp, density: float = 1.0, window_dtype: str | None = None,
                   max_grad_norm: float = 0.0):
    """The optimizer ``name`` over ``params``; ``momentum`` applies to MFAC and SGD, ``window``,
    ``damp``, ``density``, ``window_dtype`` (a name of :data:`DTYPES`) and ``max_grad_norm`` (0: no
    clipping) to MFAC only."""
    if name == "mfac":
        dtype = DTYPES[window_dtype] if window_dtype is not None else None
        return MFAC(params, lr=lr, window=window, damp=damp, momentum=momentum, weight_decay=weight_decay,
                    density=density, window_dtype=dtype, max_grad_norm=max_grad_norm or None)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise CliError(f"unknown --optimizer {name!r}: use {', '.join(OPTIMIZERS[:-1])} or {OPTIMIZERS[-1]}")
