"""Pruning settings: one validated object, resolved once where a caller's arguments come in.

:func:`~mfac.prune.prune_oneshot`, :class:`~mfac.prune.GradualPruner` and
:class:`mfac.hf.PruningCallback` each build one :class:`PruneSettings` from their arguments and
hand it down whole. ``None`` for any setting means "the default" (from :mod:`mfac.defaults`), and
``block_size=mfac.defaults.EXACT`` (the string ``"exact"``) asks for one block: the exact inverse.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .. import defaults
from ..fisher.base import check_damping

__all__ = ["PruneSettings", "METHODS", "SCOPES", "parse_pattern", "check_target"]

METHODS = ("obs", "magnitude")
SCOPES = ("global", "layer")


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """"N:M" -> (N, M): remove N of every M consecutive weights along a row."""
    if pattern is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise ValueError(f"pattern must be 'N:M' with 0 < N < M, such as '2:4', got {pattern!r}")
    return int(match[1]), int(match[2])


def check_target(sparsity, pattern: str | None) -> tuple[float | None, tuple[int, int] | None]:
    """What to prune to: (sparsity, None) for a fraction in [0, 1), or (None, (N, M)) for an "N:M"
    pattern (a sparsity given with it must equal N/M). Raises ValueError naming the argument."""
    nm = parse_pattern(pattern)
    if nm is not None:
        if sparsity is not None and not math.isclose(sparsity, nm[0] / nm[1]):
            raise ValueError(f"sparsity {sparsity} contradicts pattern {pattern!r} (which means {nm[0] / nm[1]:g}); "
                             f"pass sparsity=None with a pattern")
        return None, nm
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity), None


def _positive_int(name: str, value, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, or None for the default {default}, got {value!r}")
    return value


def _block_size(value) -> int | str:
    if value is None:
        return defaults.PRUNE_BLOCK_SIZE
    if isinstance(value, str) and value == defaults.EXACT:
        return defaults.EXACT
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"block_size must be an int >= 1 (coordinates per diagonal block of the Fisher), "
                         f"mfac.defaults.EXACT ({defaults.EXACT!r}) for one block, the exact inverse, or None for "
                         f"the default {defaults.PRUNE_BLOCK_SIZE}, got {value!r}")
    return value


@dataclass(frozen=True)
class PruneSettings:
    """How to prune (how much is each call's own target: a sparsity or an N:M pattern).

    Built from a caller's arguments: ``None`` in any field means its default, resolved here, so
    every field of a built object holds the value used. Every field is checked on construction;
    a bad one raises ValueError naming the argument and what it accepts.

    Fields:
        method: "obs" (second order, needs gradients) or "magnitude" (|w|).
        num_grads: rows of G per inverse (mini-batch gradients, or samples with ``per_sample``);
            default ``mfac.defaults.PRUNE_NUM_GRADS``.
        block_size: coordinates per diagonal block of F, or ``mfac.defaults.EXACT`` for one block
            (the exact inverse); default ``mfac.defaults.PRUNE_BLOCK_SIZE``.
        recompute: OBS sub-steps, each with fresh gradients and inverse; default
            ``mfac.defaults.PRUNE_RECOMPUTE``.
        per_sample: one gradient row per sample instead of per batch.
        scope: "global" (one ranking over all pruned weights) or "layer" (the same sparsity in
            every tensor).
        damp, relative_damp: an absolute lambda, or lambda as a fraction of the mean Fisher
            diagonal over all pruned weights; at most one. With neither, ``relative_damp`` is
            ``mfac.defaults.PRUNE_RELATIVE_DAMP``; after construction exactly one is set.
    """

    method: str = "obs"
    num_grads: int | None = None
    block_size: int | str | None = None
    recompute: int | None = None
    per_sample: bool = False
    scope: str = "global"
    damp: float | None = None
    relative_damp: float | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if not isinstance(self.per_sample, bool):
            raise ValueError(f"per_sample must be True or False, got {self.per_sample!r}")
        resolved = dict(num_grads=_positive_int("num_grads", self.num_grads, defaults.PRUNE_NUM_GRADS),
                        recompute=_positive_int("recompute", self.recompute, defaults.PRUNE_RECOMPUTE),
                        block_size=_block_size(self.block_size))
        relative = defaults.PRUNE_RELATIVE_DAMP if self.damp is None and self.relative_damp is None \
            else self.relative_damp
        resolved["damp"], resolved["relative_damp"] = check_damping(self.damp, relative)
        for name, value in resolved.items():
            object.__setattr__(self, name, value)

    @property
    def exact(self) -> bool:
        """One block: the exact inverse of the damped Fisher, through the gradient matrix."""
        return self.block_size == defaults.EXACT

    @property
    def streamed(self) -> bool:
        """Blocks no larger than num_grads: their statistics are accumulated from chunks of gradient
        rows, and the (num_grads, d) gradient matrix is never held."""
        return not self.exact and self.block_size <= self.num_grads

    def sub_steps(self, nm: tuple[int, int] | None = None) -> int:
        """Sub-steps of one prune to the target: ``recompute`` for OBS (at most N with an N:M
        pattern), one for magnitude."""
        if self.method != "obs":
            return 1
        return min(self.recompute, nm[0]) if nm is not None else self.recompute
