"""The dense reference: F^-1 as an explicit d x d matrix.

Use it for tiny problems and as the yardstick the matrix-free classes are tested against.
It forms F in float64 and keeps its Cholesky factor (for ``ihvp``: two triangular solves, backward
stable) and the explicit inverse (for ``diag``, ``element`` and ``column`` lookups), both in ``dtype``.
"""

from __future__ import annotations

import torch

from .base import FisherInverse, check_damp, check_gradients, compute_dtype, robust_cholesky

__all__ = ["DenseFisherInverse"]


class DenseFisherInverse(FisherInverse):
    """Explicit inverse of F = damp*I + G^T G / m.

    Args:
        grads: (m, d) floating tensor, one gradient per row (m may be 0: then F = damp*I).
        damp: lambda > 0.

    Cost: O(d^2 m + d^3) time, 2 d^2 numbers of memory. ``ihvp`` is two d x d triangular solves,
    the other queries are lookups.
    """

    def __init__(self, grads: torch.Tensor, damp: float):
        grads = check_gradients(grads)
        self._damp = check_damp(damp)
        self._num_grads, self._dim = grads.shape
        self._dtype = compute_dtype(grads.dtype)
        g64 = grads.to(torch.float64)
        fisher = g64.T @ g64 / max(self._num_grads, 1)
        fisher.diagonal().add_(self._damp)
        lower = robust_cholesky(fisher, self._damp)
        self._lower = lower.to(self._dtype)
        self._inverse = torch.cholesky_inverse(lower).to(self._dtype)

    dim = property(lambda self: self._dim)
    num_grads = property(lambda self: self._num_grads)
    damp = property(lambda self: self._damp)
    device = property(lambda self: self._inverse.device)
    dtype = property(lambda self: self._dtype)
    nbytes = property(lambda self: 2 * self._inverse.numel() * self._inverse.element_size())

    def ihvp(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_vectors(x)
        # A solve with the factor, not a product with the explicit inverse: the latter is accurate only
        # to eps * cond(F)^2 for x along F's large eigenvalues.
        columns = x.mT if x.dim() == 2 else x[:, None]
        out = torch.cholesky_solve(columns, self._lower)
        return out.mT.contiguous() if x.dim() == 2 else out[:, 0]

    def diag(self) -> torch.Tensor:
        return self._inverse.diagonal().clone()

    def element(self, i, j) -> torch.Tensor:
        i, j = self._check_pair(i, j)
        return self._inverse[i, j].clone()

    def column(self, j: int) -> torch.Tensor:
        return self._inverse[:, self._column_index(j)].clone()

    def to_dense(self) -> torch.Tensor:
        return self._inverse.clone()
