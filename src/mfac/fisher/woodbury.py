"""The small linear algebra every window form shares, as plain functions of tensors.

A window of k gradients G (k, d) represents F = damp*I + G^T G / k. Two routes give F^-1 x:

* dual (d > k): F^-1 x = (x - G^T K^-1 G x) / damp with K = k*damp*I + G G^T (k x k), factored as
  K = L L^T from the float64 Gram matrix S = G G^T. Cost O(k^3 / 3) per factorisation, O(k^2) per
  solve.
* primal (d <= k, one process): K above is rank-deficient beyond d and far worse conditioned than F,
  so the d x d matrix k*damp*I + G^T G is factored instead (from the rows, in float64,
  O(k d^2 + d^3 / 3)); then F^-1 x = k (k*damp*I + G^T G)^-1 x.

Both factorisations go through :func:`mfac.fisher.base.robust_cholesky`, so a matrix that round-off
made indefinite is repaired rather than refused. Factors are kept upper, K = U^T U (:class:`Factor`).

A full window's push changes K in one row and column: its oldest gradient's. Kept in age order, that
is the leading row and column, whose removal turns the trailing part of U into a rank-one *update*
(Givens rotations, no cancellation), and the new gradient is one triangular solve and one square
root at the end: O(k^2) instead of O(k^3 / 3) (:func:`shifted`). A probe product checks every
updated factor against K (:func:`drift`), and one that has drifted is replaced by a refactorisation:
an update's round-off is relative to K at the time, so errors made while a large gradient was held
can be large against the smaller K left once it has gone (a probe every few pushes, or only when a
large gradient leaves, missed such cases in the property tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import kernels
from .base import robust_cholesky

__all__ = ["Factor", "dual_matrix", "factor", "shifted", "drift", "drift_tolerance", "SMALLEST_UPDATED", "primal_apply"]

# Windows smaller than this refactorise at every push: there a fresh factorisation is cheaper than
# the update with its probe (measured at d = 10k: 0.06 against 0.14 ms at m = 64; 0.42 against
# 0.26 ms at m = 256; BENCHMARKS.md#sliding-static-and-block-inverses).
SMALLEST_UPDATED = 128


def drift_tolerance(size: int) -> float:
    """How far U^T U z may lie from K z, relative to ||K z||, before an updated factor of ``size``
    rows is replaced by a refactorisation: 16 sqrt(size) eps. Measured (BENCHMARKS.md, window
    push): a fresh factorisation leaves about 0.2-2 eps, updated ones a median of 1.5-12 eps with
    rare peaks near 40 eps on streams mixing scales over six orders, collinear and zero rows, and
    no growth over 200 windows of pushes; Cholesky's own backward error bound is of order size * eps."""
    return 16 * math.sqrt(max(size, 1)) * torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class Factor:
    """K = U^T U: ``upper`` U (r, r) float64, contiguous, upper triangular with a positive diagonal.

    On the dual route the rows and columns of U are in the *age order* of the gradients: index i
    belongs to the i-th oldest, held in ring-buffer slot (offset + i) % r. That order is what makes
    a push O(r^2) (:func:`shifted`): the oldest gradient is always index 0. Vectors come in and go
    out in slot order; the permutation is a rotation, O(r). On the primal route U factors a d x d
    matrix over coordinates and ``offset`` is 0.
    """

    upper: torch.Tensor
    offset: int = 0
    # U's storage was made for this factor alone (never a caller's tensor) and is zero below the
    # diagonal: once the factor is replaced, an update may write the next factor into it.
    reusable: bool = False

    @property
    def size(self) -> int:
        return self.upper.shape[0]

    def to_age(self, slots: torch.Tensor) -> torch.Tensor:
        """Rows of a slot-ordered (r,) or (r, n) tensor in age order."""
        return torch.roll(slots, -self.offset, 0) if self.offset else slots

    def to_slots(self, ages: torch.Tensor) -> torch.Tensor:
        return torch.roll(ages, self.offset, 0) if self.offset else ages

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """K^-1 rhs for rhs (r,) or (r, n) float64 in slot order: two triangular solves, O(r^2 n).
        (Two ``solve_triangular`` calls: ``cholesky_solve`` measured 10x slower at r = 1024.)"""
        columns = rhs if rhs.dim() == 2 else rhs[:, None]
        half = torch.linalg.solve_triangular(self.upper.mT, self.to_age(columns), upper=False)
        out = self.to_slots(torch.linalg.solve_triangular(self.upper, half, upper=True))
        return out if rhs.dim() == 2 else out[:, 0]

    def solve_newest(self) -> torch.Tensor:
        """K^-1 e_j for the newest gradient (age index r - 1, slot ``(offset - 1) % r``), in slot order:
        U^T y = e_j is y = e_j / U[r-1, r-1], so one triangular solve, O(r^2)."""
        r = self.size
        last = torch.zeros(r, 1, dtype=self.upper.dtype, device=self.upper.device)
        last[-1] = 1.0 / self.upper[-1, -1]
        return self.to_slots(torch.linalg.solve_triangular(self.upper, last, upper=True))[:, 0]

    def whiten(self, columns: torch.Tensor) -> torch.Tensor:
        """U^-T columns for columns (r, n) float64 in slot order; the result's rows are in age order
        (it is only ever used through inner products of its columns, which do not depend on it)."""
        return torch.linalg.solve_triangular(self.upper.mT, self.to_age(columns), upper=False)

    def product(self, z: torch.Tensor) -> torch.Tensor:
        """U^T U z for z (r,) float64 in age order: O(r^2)."""
        return self.upper.mT @ (self.upper @ z)


def dual_matrix(gram: torch.Tensor, damp: float, offset: int) -> torch.Tensor:
    """K = k*damp*I + gram in age order (the gradient in slot ``offset`` first), a new (k, k) tensor."""
    k = gram.shape[0]
    matrix = torch.roll(gram, (-offset, -offset), (0, 1)) if offset else gram.clone()
    matrix.diagonal().add_(k * damp)
    return matrix


def factor(gram: torch.Tensor, rows: torch.Tensor | None, damp: float, primal: bool, offset: int = 0) -> Factor:
    """Factor the route's matrix from scratch: k*damp*I + gram (dual; ``gram`` (k, k) float64 in slot
    order, factored in age order from slot ``offset``), or k*damp*I + rows^T rows (primal; ``rows``
    (k, d), any floating dtype, used in float64). O(r^3 / 3)."""
    k = gram.shape[0]
    if primal:
        if k == 0:
            return Factor(torch.zeros(0, 0, dtype=torch.float64, device=gram.device))
        rows = rows.to(torch.float64)
        matrix = rows.T @ rows
        matrix = (matrix + matrix.T) / 2
        matrix.diagonal().add_(k * damp)
        offset = 0
    else:
        offset = offset % k if k else 0
        matrix = dual_matrix(gram, damp, offset)
    return Factor(robust_cholesky(matrix, k * damp).mT.contiguous(), offset, reusable=True)


def shifted(old: Factor, column: torch.Tensor, diag: float, offset: int, probe: torch.Tensor | None = None,
            check: tuple[torch.Tensor, torch.Tensor] | None = None,
            out: torch.Tensor | None = None) -> tuple[Factor, torch.Tensor | None, torch.Tensor | None] | None:
    """The dual factor after the oldest of a full window's r gradients leaves and a new one arrives
    (as index r - 1 of the age order, which then starts at slot ``offset``): ``column`` (r - 1,)
    float64 holds its entries of K with the others in the new age order, ``diag`` its diagonal
    entry. Returns the factor; for a ``probe`` z (r,) in age order, U^T U z to check it with
    (:func:`drift`); and for ``check`` = (S, v), (r, r) and (r,) float64, S v, computed on a second
    core meanwhile (else None). ``out``: the storage of a reusable factor no longer in use, to write
    the new one into (a fresh (r, r) tensor costs r^2 / 512 page faults on first touch, as much as
    the update itself at r = 1024). O(r^2) (:func:`mfac.kernels.factor_shift`); None where that
    kernel cannot run or the new pivot is not positive, and the caller refactorises (``out`` then
    holds scratch above its diagonal and is still zero below)."""
    gram, gram_probe = check if check is not None else (None, None)
    result = kernels.factor_shift(old.upper, column.contiguous(), diag, probe, gram, gram_probe, out=out)
    if result is None:
        return None
    upper, product, gram_times = result
    return Factor(upper, offset % upper.shape[0], reusable=True), product, gram_times


def drift(product: torch.Tensor, k_times_z: torch.Tensor) -> float:
    """||U^T U z - K z|| / ||K z|| from U^T U z (``product``) and K z, both (r,) float64 in the same
    order: how far a factor has moved from the matrix it stands for."""
    scale = float(torch.linalg.vector_norm(k_times_z))
    error = float(torch.linalg.vector_norm(product - k_times_z))
    return error / scale if scale > 0 else error


def primal_apply(x: torch.Tensor, fac: Factor, k: int, damp: float, dtype: torch.dtype) -> torch.Tensor:
    """Primal route: F^-1 x = k (k*damp*I + G^T G)^-1 x for x (d,) or (d, n); result in ``dtype``."""
    if k == 0:
        return (x / damp).to(dtype)
    return (fac.solve(x.to(torch.float64)) * k).to(dtype)
