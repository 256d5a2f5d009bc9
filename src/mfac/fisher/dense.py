"""The dense reference: F^-1 as an explicit d x d matrix.

Use it for tiny problems and as the yardstick the matrix-free classes are tested against.
It forms F in float64, inverts it through a Cholesky factor and keeps the inverse in ``dtype``.
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

    Cost: O(d^2 m + d^3) time, O(d^2) memory. Every query is a lookup or a d x d matvec.
    """

    def __init__(self, grads: torch.Tensor, damp: float):
        grads = check_gradients(grads)
        self._damp = check_damp(damp)
        self._num_grads, self._dim = grads.shape
        self._dtype = compute_dtype(grads.dtype)
        g64 = grads.to(torch.float64)
        fisher = g64.T @ g64 / max(self._num_grads, 1)
        fisher.diagonal().add_(self._damp)
        self._inverse = torch.cholesky_inverse(robust_cholesky(fisher, self._damp)).to(self._dtype)

    dim = property(lambda self: self._dim)
    num_grads = property(lambda self: self._num_grads)
    damp = property(lambda self: self._damp)
    device = property(lambda self: self._inverse.device)
    dtype = property(lambda self: self._dtype)
    nbytes = property(lambda self: self._inverse.numel() * self._inverse.element_size())

    def ihvp(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_vectors(x)
        return x @ self._inverse  # the inverse is symmetric, so x F^-1 = (F^-1 x^T)^T

    def diag(self) -> torch.Tensor:
        return self._inverse.diagonal().clone()

    def element(self, i, j) -> torch.Tensor:
        i, j = self._check_pair(i, j)
        return self._inverse[i, j]

    def column(self, j: int) -> torch.Tensor:
        return self._inverse[:, self._column_index(j)].clone()

    def to_dense(self) -> torch.Tensor:
        return self._inverse.clone()
