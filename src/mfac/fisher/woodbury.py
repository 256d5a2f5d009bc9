"""The small linear algebra every window form shares, as plain functions of tensors.

A window of k gradients G (k, d) represents F = damp*I + G^T G / k. Two routes give F^-1 x:

* dual (d > k): F^-1 x = (x - G^T K^-1 G x) / damp with K = k*damp*I + G G^T (k x k), factored as
  K = L L^T from the float64 Gram matrix S = G G^T. Cost O(k^3 / 3) per factorisation, O(k^2) per
  solve.
* primal (d <= k, one process): K above is rank-deficient beyond d and far worse conditioned than F,
  so the d x d matrix k*damp*I + G^T G is factored instead (from the rows, in float64,
  O(k d^2 + d^3 / 3)); then F^-1 x = k (k*damp*I + G^T G)^-1 x.

Both factorisations go through :func:`mfac.fisher.base.robust_cholesky`, so a matrix that round-off
made indefinite is repaired rather than refused.
"""

from __future__ import annotations

import torch

from .base import robust_cholesky

__all__ = ["factor", "solve", "primal_apply"]


def factor(gram: torch.Tensor, rows: torch.Tensor | None, damp: float, primal: bool) -> torch.Tensor:
    """The float64 Cholesky factor of the route: of k*damp*I + gram (dual; ``gram`` (k, k) float64),
    or of k*damp*I + rows^T rows (primal; ``rows`` (k, d), any floating dtype, used in float64)."""
    k = gram.shape[0]
    if primal:
        if k == 0:
            return torch.zeros(0, 0, dtype=torch.float64, device=gram.device)
        rows = rows.to(torch.float64)
        shifted = rows.T @ rows
        shifted = (shifted + shifted.T) / 2
    else:
        shifted = gram.clone()
    shifted.diagonal().add_(k * damp)
    return robust_cholesky(shifted, k * damp)


def solve(lower: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """(L L^T)^-1 rhs for rhs of shape (k,) or (k, n), float64: two triangular solves."""
    columns = rhs if rhs.dim() == 2 else rhs[:, None]
    out = torch.cholesky_solve(columns, lower)
    return out if rhs.dim() == 2 else out[:, 0]


def primal_apply(x: torch.Tensor, lower: torch.Tensor, k: int, damp: float, dtype: torch.dtype) -> torch.Tensor:
    """Primal route: F^-1 x = k (k*damp*I + G^T G)^-1 x for x (d,) or (d, n); result in ``dtype``."""
    if k == 0:
        return (x / damp).to(dtype)
    return (solve(lower, x.to(torch.float64)) * k).to(dtype)
