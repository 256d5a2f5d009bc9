"""Every default setting of mfac, each defined once.

The library's signatures, the command line, :mod:`mfac.hf` and the pruners all import these names,
so a default changes in one place. ``None`` passed for any of these settings means "this default".

Optimizer (:class:`mfac.MFAC`)
    ``MFAC_LR``, ``MFAC_WINDOW``, ``MFAC_DAMP``: the class defaults, the values published for
    ResNets (Frantar et al., 2021).
    ``SMALL_MODEL_RECIPE``: what the command line and the demo use for the built-in models (an MLP
    or CNN on digits, ResNet-20 on CIFAR): a short window and a large damp, chosen on digits.
    ``TRANSFORMER_RECIPE``: fine-tuning a BERT-size model (MiniLM-L6 on SST-2, BENCHMARKS.md#fine-tuning-minilm-l6-on-sst-2):
    a compressed bfloat16 window of 1024 gradients at 1% density, gradients clipped to norm 1 by
    the optimizer itself (so a plain loop trains as Trainer does; BENCHMARKS.md#clipping-and-the-transformer-recipe).

Pruning (:func:`mfac.prune.prune_oneshot`, :class:`mfac.prune.GradualPruner`,
:class:`mfac.hf.PruningCallback`)
    ``PRUNE_RELATIVE_DAMP``: lambda as a fraction of the mean Fisher diagonal (held-out choice on
    the digits MLP and ResNet-20, BENCHMARKS.md#choosing-the-damping).
    ``PRUNE_NUM_GRADS``, ``PRUNE_BLOCK_SIZE``, ``PRUNE_RECOMPUTE``: one-shot OBS as published
    (M-FAC: blocks of 128, 16 recomputations).
    ``GRADUAL_RECOMPUTE``, ``GRADUAL_NUM_GRADS``: each pruning step of a gradual schedule (one
    inverse per step, fewer gradients: the schedule itself recomputes).
    ``EXACT``: the spelling of "no blocks, the exact inverse" for ``block_size``.

Command line (:mod:`mfac.cli`)
    ``GRADUAL_LR``: the learning rate of ``mfac prune --gradual`` on the built-in models (``hf:``
    models use ``TRANSFORMER_RECIPE.lr``).
    ``CHECKPOINT_EVERY``: steps between the checkpoints of ``mfac train`` and ``mfac prune --gradual``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "MFAC_LR", "MFAC_WINDOW", "MFAC_DAMP", "OptimizerRecipe", "SMALL_MODEL_RECIPE", "TRANSFORMER_RECIPE",
    "PRUNE_RELATIVE_DAMP", "PRUNE_NUM_GRADS", "PRUNE_BLOCK_SIZE", "PRUNE_RECOMPUTE", "GRADUAL_RECOMPUTE",
    "GRADUAL_NUM_GRADS", "EXACT", "GRADUAL_LR", "CHECKPOINT_EVERY",
]

MFAC_LR = 1e-3
MFAC_WINDOW = 512
MFAC_DAMP = 1e-5


@dataclass(frozen=True)
class OptimizerRecipe:
    """Settings of :class:`mfac.MFAC` for one kind of model; ``kwargs()`` passes them on."""

    lr: float
    window: int
    damp: float
    momentum: float = 0.0
    density: float = 1.0
    window_dtype: torch.dtype | None = None
    max_grad_norm: float | None = None

    def kwargs(self) -> dict:
        return dict(lr=self.lr, window=self.window, damp=self.damp, momentum=self.momentum, density=self.density,
                    window_dtype=self.window_dtype, max_grad_norm=self.max_grad_norm)


SMALL_MODEL_RECIPE = OptimizerRecipe(lr=3e-3, window=64, damp=1e-2, momentum=0.9)
TRANSFORMER_RECIPE = OptimizerRecipe(lr=3e-5, window=1024, damp=1e-4, density=0.01, window_dtype=torch.bfloat16,
                                     max_grad_norm=1.0)

PRUNE_RELATIVE_DAMP = 0.3
PRUNE_NUM_GRADS = 256
PRUNE_BLOCK_SIZE = 128
PRUNE_RECOMPUTE = 16
GRADUAL_RECOMPUTE = 1
GRADUAL_NUM_GRADS = 64
EXACT = "exact"
GRADUAL_LR = 1e-3
CHECKPOINT_EVERY = 100
