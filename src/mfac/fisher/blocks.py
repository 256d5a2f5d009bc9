"""Matrix-free inverses built once from a fixed set of gradients: static and block-diagonal.

Both classes rest on one factorisation. For a block of B coordinates with gradients G_b (m, B),
F_b = damp*I + G_b^T G_b / m is inverted exactly and stored as

    F_b^-1 = alpha * I + scale * U_b^T U_b,

choosing the cheaper of two exact routes for the block size:

* B <= m ("primal"): factor the B x B matrix F_b = L L^T and keep U_b = L^-1 (B, B), alpha = 0,
  scale = 1. Cost O(B^2 m + B^3) per block; memory B^2 per block.
* B > m ("dual", Woodbury): factor the m x m matrix K_b = m*damp*I + G_b G_b^T = C C^T and keep
  U_b = C^-1 G_b (m, B), alpha = 1/damp, scale = -1/damp. Cost O(B m^2 + m^3) per block;
  memory m*B per block, the size of the gradients themselves. This is the same object that the
  M-FAC paper's Sherman-Morrison recursion builds one gradient at a time; a Cholesky factor builds
  it with matrix-matrix products and is backward stable.

The small factorisations always run in float64 (the conditioning of K is poor when damp is
small); U is kept in float32, or float64 when the gradients are float64. Blocks of equal size are
processed together with batched tensor ops; a shorter last block forms a second batch of one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import resources
from .base import FisherInverse, check_damp, check_gradients, compute_dtype, robust_cholesky

__all__ = ["BlockFisherInverse", "StaticFisherInverse"]

# float64 elements per temporary tile while factorising: bounds the extra memory to 128 MiB.
_TILE_ELEMENTS = 1 << 24


@dataclass
class _BlockBatch:
    """``count`` consecutive blocks of ``size`` coordinates starting at coordinate ``start``."""

    start: int
    count: int
    size: int
    factor: torch.Tensor  # U, (count, r, size)
    alpha: float
    scale: float

    @property
    def stop(self) -> int:
        return self.start + self.count * self.size

    @property
    def route(self) -> str:
        return "primal" if self.alpha == 0.0 else "dual"


def _factor_blocks(blocks: torch.Tensor, damp: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, float, float]:
    """Factor F_b for each of the (nb, m, B) gradient blocks; returns (U, alpha, scale)."""
    nb, m, size = blocks.shape
    f64 = torch.float64
    if m == 0:
        return blocks.new_zeros((nb, 0, size), dtype=out_dtype), 1.0 / damp, -1.0 / damp
    if size <= m:
        fisher = blocks.new_zeros((nb, size, size), dtype=f64)
        rows = max(1, _TILE_ELEMENTS // (nb * size))
        for r0 in range(0, m, rows):
            tile = blocks[:, r0 : r0 + rows].to(f64)
            fisher.baddbmm_(tile.transpose(1, 2), tile)
        fisher.div_(m).diagonal(dim1=1, dim2=2).add_(damp)
        lower = robust_cholesky(fisher, damp)
        eye = torch.eye(size, dtype=f64, device=blocks.device).expand(nb, size, size)
        return torch.linalg.solve_triangular(lower, eye, upper=False).to(out_dtype), 0.0, 1.0
    cols = max(1, _TILE_ELEMENTS // (nb * m))
    gram = blocks.new_zeros((nb, m, m), dtype=f64)
    for c0 in range(0, size, cols):
        tile = blocks[:, :, c0 : c0 + cols].to(f64)
        gram.baddbmm_(tile, tile.transpose(1, 2))
    gram.diagonal(dim1=1, dim2=2).add_(m * damp)
    lower = robust_cholesky(gram, m * damp)
    factor = torch.empty((nb, m, size), dtype=out_dtype, device=blocks.device)
    for c0 in range(0, size, cols):
        tile = blocks[:, :, c0 : c0 + cols].to(f64)
        factor[:, :, c0 : c0 + cols] = torch.linalg.solve_triangular(lower, tile, upper=False)
    return factor, 1.0 / damp, -1.0 / damp


class BlockFisherInverse(FisherInverse):
    """Block-diagonal approximation of F^-1: each run of ``block_size`` consecutive coordinates
    gets its own exact inverse of damp*I + G_b^T G_b / m, and coordinates in different blocks are
    treated as uncorrelated ([F^-1]_ij = 0 across blocks). The last block may be shorter.

    Args:
        grads: (m, d) floating tensor, one gradient per row (m may be 0, or 1, or exceed d).
        damp: lambda > 0.
        block_size: B >= 1; B >= d gives the exact, unblocked inverse (see ``StaticFisherInverse``).

    Cost with B = min(block_size, d): setup O(d m min(B, m) + d min(B, m)^2); ``ihvp`` O(d min(B, m));
    ``element`` O(min(B, m)); ``column`` O(B min(B, m)); ``diag`` O(d min(B, m)).
    Memory: d * min(B, m) numbers in float32 (float64 for float64 gradients).
    """

    def __init__(self, grads: torch.Tensor, damp: float, block_size: int):
        grads = check_gradients(grads)
        self._damp = check_damp(damp)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        m, d = grads.shape
        rank = min(block_size, d, m) if m else 0
        element = torch.empty(0, dtype=compute_dtype(grads.dtype)).element_size()
        # factors (d x rank) plus, while factorising, float64 work of the same size and two tiles
        needed = d * rank * (element + 2 * 8) + 2 * 8 * _TILE_ELEMENTS
        resources.check_fits(needed, grads.device,
                             f"a block-diagonal Fisher inverse of {m} gradients of {d:,} coordinates "
                             f"(block_size {block_size})", "lower block_size or the number of gradients")
        self._num_grads, self._dim = grads.shape
        self._dtype = compute_dtype(grads.dtype)
        self._block_size = min(block_size, self._dim)
        size, full = self._block_size, self._dim // self._block_size
        self._batches: list[_BlockBatch] = []
        for start, count, width in ((0, full, size), (full * size, 1, self._dim - full * size)):
            if count == 0 or width == 0:
                continue
            blocks = grads[:, start : start + count * width].reshape(self._num_grads, count, width).transpose(0, 1)
            factor, alpha, scale = _factor_blocks(blocks, self._damp, self._dtype)
            self._batches.append(_BlockBatch(start, count, width, factor, alpha, scale))

    dim = property(lambda self: self._dim)
    num_grads = property(lambda self: self._num_grads)
    damp = property(lambda self: self._damp)
    dtype = property(lambda self: self._dtype)
    device = property(lambda self: self._batches[0].factor.device)
    block_size = property(lambda self: self._block_size, doc="B, the size of every block but possibly the last.")
    nbytes = property(lambda self: sum(b.factor.numel() * b.factor.element_size() for b in self._batches))

    @property
    def routes(self) -> tuple[str, ...]:
        """Which exact route each batch of blocks took: 'primal' (B x B) or 'dual' (m x m)."""
        return tuple(b.route for b in self._batches)

    def ihvp(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_vectors(x)
        rows = x.reshape(-1, self._dim)
        out = torch.empty_like(rows)
        for b in self._batches:
            # (k, count*size) -> (count, k, size): vectors as rows, which batched kernels handle
            # markedly faster than batched matrix-vector products.
            xb = rows[:, b.start : b.stop].reshape(-1, b.count, b.size).transpose(0, 1)
            coeffs = torch.bmm(xb, b.factor.transpose(1, 2))
            yb = torch.baddbmm(xb, coeffs, b.factor, beta=b.alpha, alpha=b.scale)
            out[:, b.start : b.stop] = yb.transpose(0, 1).reshape(-1, b.count * b.size)
        return out.reshape(x.shape)

    def diag(self) -> torch.Tensor:
        parts = [b.alpha + b.scale * torch.linalg.vector_norm(b.factor, dim=1).square() for b in self._batches]
        return torch.cat([p.reshape(-1) for p in parts])

    def element(self, i, j) -> torch.Tensor:
        i, j = self._check_pair(i, j)
        out = torch.zeros(i.shape, dtype=self._dtype, device=self.device)
        for b in self._batches:
            li, lj = i - b.start, j - b.start
            inside = (li >= 0) & (li < b.stop - b.start) & (lj >= 0) & (lj < b.stop - b.start)
            same = inside & (li.div(b.size, rounding_mode="floor") == lj.div(b.size, rounding_mode="floor"))
            li, lj = li[same], lj[same]
            block = li // b.size
            ui = b.factor[block, :, li % b.size]  # (n, r)
            uj = b.factor[block, :, lj % b.size]
            out[same] = b.alpha * (li == lj).to(self._dtype) + b.scale * (ui * uj).sum(-1)
        return out

    def column(self, j: int) -> torch.Tensor:
        j = self._column_index(j)
        out = torch.zeros(self._dim, dtype=self._dtype, device=self.device)
        b = next(b for b in self._batches if b.start <= j < b.stop)
        block, offset = divmod(j - b.start, b.size)
        factor = b.factor[block]  # (r, size)
        values = b.scale * (factor.T @ factor[:, offset])
        values[offset] += b.alpha
        first = b.start + block * b.size
        out[first : first + b.size] = values
        return out


class StaticFisherInverse(BlockFisherInverse):
    """Exact, matrix-free F^-1 for a fixed set of gradients (one block covering all d coordinates).

    Args:
        grads: (m, d) floating tensor, one gradient per row.
        damp: lambda > 0.

    When m < d (the usual case) this is the M-FAC static algorithm: setup O(d m^2 + m^3), then
    ``ihvp`` O(d m), ``element`` O(m), ``column`` and ``diag`` O(d m), memory d*m numbers.
    When d <= m it factors the d x d matrix instead, which is both cheaper and better conditioned.
    """

    def __init__(self, grads: torch.Tensor, damp: float):
        grads = check_gradients(grads)
        super().__init__(grads, damp, block_size=grads.shape[1])
