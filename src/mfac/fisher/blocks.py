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

The primal route can also be built without ever holding G: :meth:`BlockFisherInverse.from_chunks`
accumulates each block's G_b^T G_b from chunks of gradient rows as they arrive (one batched rank-n
update per chunk) and factorises in place, so memory is about d (B + 32) / 2 numbers whatever m is:
each block's lower triangle, packed by rows (:class:`mfac.fisher.block_factor.RowLayout`).

Damping is absolute (``damp``) or relative (``relative_damp``: lambda = relative_damp * the mean
diagonal of G^T G / m over all d coordinates, as SparseGPT's percdamp does per layer), which
follows the scale of the gradients, so one setting serves models whose gradients differ by orders
of magnitude. One lambda serves every block: a per-block lambda would rescale each block's
saliencies separately and spoil the global ranking OBS makes across blocks (measured in
BENCHMARKS.md#choosing-the-damping). If every gradient is zero, lambda = relative_damp.

U is kept in float32, or float64 when the gradients are float64. The primal route's B x B
factorisations run in the precision each block's measured conditioning allows (float32 where its
residual is small, float64 otherwise: :mod:`mfac.fisher.block_factor`); the dual route's m x m
ones always run in float64 (the conditioning of K is poor when damp is small). Blocks of equal size are
processed together with batched tensor ops; a shorter last block forms a second batch of one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .. import kernels, resources
from .base import (FisherInverse, check_damping, check_finite, check_gradients, check_index, compute_dtype,
                   robust_cholesky)
from .block_factor import COLUMN_BYTES, TILE_ELEMENTS, RowLayout, inverse_cholesky_factors

__all__ = ["BlockFisherInverse", "StaticFisherInverse"]

_SUBMATRIX_BYTES = 1 << 28  # factor columns gathered at a time by ``submatrices``: 256 MB


@dataclass
class _BlockBatch:
    """``count`` consecutive blocks of ``size`` coordinates starting at coordinate ``start``."""

    start: int
    count: int
    size: int
    factor: torch.Tensor  # U, (count, layout.length): each block's (r, size) rows as layout says
    layout: RowLayout
    route: str  # "primal" (B x B factor: alpha 0, scale 1) or "dual" (m x B factor: alpha 1/damp, scale -1/damp)
    alpha: float
    scale: float

    @property
    def stop(self) -> int:
        return self.start + self.count * self.size

    def bands(self):
        """(first row, end row, columns, U[:, first:end, :columns] as a (count, rows, columns) view)
        for each band of equally long stored rows (:meth:`RowLayout.band_views`): the columns past a
        row's stored ones are zero, so products with U need only these views, read in place."""
        return self.layout.band_views(self.factor)


def _resolve_damp(mean_diagonal: float, damp: float | None, relative: float | None) -> float:
    """The lambda to use: ``damp``, or ``relative`` times the mean Fisher diagonal over all
    coordinates (``relative`` itself when every gradient is zero)."""
    if damp is not None:
        return damp
    value = relative * mean_diagonal if mean_diagonal > 0 else relative
    return max(value, torch.finfo(torch.float32).tiny)


def _factor_blocks(blocks: torch.Tensor, damp: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, str, int]:
    """Factor F_b for each of the (nb, m, B) gradient blocks; returns (U, route, blocks factorised
    in float64 on the primal route)."""
    nb, m, size = blocks.shape
    f64 = torch.float64
    if m == 0:
        return blocks.new_zeros((nb, 0, size), dtype=out_dtype), "dual", 0
    if size <= m:
        fisher = blocks.new_zeros((nb, size, size), dtype=f64)
        rows = max(1, TILE_ELEMENTS // (nb * size))
        for r0 in range(0, m, rows):
            tile = blocks[:, r0: r0 + rows].to(f64)
            fisher.baddbmm_(tile.transpose(1, 2), tile)
        fisher.div_(m)
        factor = torch.empty((nb, size, size), dtype=out_dtype, device=blocks.device)
        in_float64 = inverse_cholesky_factors(fisher.reshape(nb, -1), RowLayout.dense(size, size), damp,
                                              factor.reshape(nb, -1))
        return factor, "primal", in_float64
    cols = max(1, TILE_ELEMENTS // (nb * m))
    gram = blocks.new_zeros((nb, m, m), dtype=f64)
    for c0 in range(0, size, cols):
        tile = blocks[:, :, c0: c0 + cols].to(f64)
        gram.baddbmm_(tile, tile.transpose(1, 2))
    gram.diagonal(dim1=1, dim2=2).add_(m * damp)
    lower = robust_cholesky(gram, m * damp)
    factor = torch.empty((nb, m, size), dtype=out_dtype, device=blocks.device)
    for c0 in range(0, size, cols):
        tile = blocks[:, :, c0: c0 + cols].to(f64)
        factor[:, :, c0: c0 + cols] = torch.linalg.solve_triangular(lower, tile, upper=False)
    return factor, "dual", 0


def _batch_layout(dim: int, block_size: int) -> list[tuple[int, int, int]]:
    """(start, count, size) of the full blocks, then of a shorter last block if any."""
    full = dim // block_size
    layout = [(0, full, block_size), (full * block_size, 1, dim - full * block_size)]
    return [(start, count, size) for start, count, size in layout if count and size]


def _accumulate(sums: list[torch.Tensor], layout: list[tuple[int, int, int]], stored: list[RowLayout],
                rows: torch.Tensor) -> None:
    """Add each block's G_b^T G_b over ``rows`` (n, d) to its sums ((count, length), lower triangles
    stored as ``stored`` says): in the compiled kernel (which checks the rows for NaN and Inf as it
    reads them), else by batched products after a check. Raises NonFiniteGradientError (the sums
    are then spoilt)."""
    for (start, count, width), shape, total in zip(layout, stored, sums):
        columns = rows[:, start: start + count * width]
        done = kernels.gram_update(total, rows, start, starts=shape.starts)
        if done is not None:
            if not done:  # the kernel met NaN or Inf in these columns: name it
                check_finite("a gradient chunk", columns)
            continue
        check_finite("a gradient chunk", columns)
        # Blocks in tiles of 16 MB, copied to (blocks, rows, B) order first: the batched product then
        # runs near plain-matmul speed (strided operands run slower), and the copy and the products
        # stay small (a whole chunk's worth would add gigabytes).
        per_tile = max(1, min(TILE_ELEMENTS // (4 * len(rows) * width), TILE_ELEMENTS // (4 * width * width)))
        for b0 in range(0, count, per_tile):
            b1 = min(count, b0 + per_tile)
            part = columns[:, b0 * width: b1 * width].reshape(len(rows), b1 - b0, width)
            part = part.transpose(0, 1).contiguous()
            total[b0:b1] += shape.pack(torch.bmm(part.transpose(1, 2), part))


def _peak_bytes(m: int, d: int, block_size: int, element: int) -> int:
    """Peak bytes of building a BlockFisherInverse from an (m, d) matrix: the factors, plus the float64
    block Gram matrices (B <= m: d x B; B > m: m x m per block, and its Cholesky factor) and tiles."""
    size = min(block_size, d)
    blocks = -(-d // size)
    if size <= m:
        work = d * size * 8
    else:
        work = 2 * blocks * m * m * 8
    return d * min(size, m) * element + work + 3 * 8 * min(TILE_ELEMENTS, d * size)


def _check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    return block_size


class BlockFisherInverse(FisherInverse):
    """Block-diagonal approximation of F^-1: each run of ``block_size`` consecutive coordinates
    gets its own exact inverse of damp*I + G_b^T G_b / m, and coordinates in different blocks are
    treated as uncorrelated ([F^-1]_ij = 0 across blocks). The last block may be shorter.

    Args:
        grads: (m, d) floating tensor, one gradient per row (m may be 0, or 1, or exceed d).
        damp: lambda > 0; or None to use ``relative_damp``.
        block_size: B >= 1; B >= d gives the exact, unblocked inverse (see ``StaticFisherInverse``).
        relative_damp: with ``damp=None``, lambda is this fraction of the mean diagonal of
            G^T G / m over all coordinates (``damp`` then reports the value used).

    Cost with B = min(block_size, d): setup O(d m min(B, m) + d min(B, m)^2); ``ihvp`` O(d min(B, m));
    ``element`` O(min(B, m)); ``column`` O(B min(B, m)); ``diag`` O(d min(B, m)).
    Memory: d * min(B, m) numbers in float32 (float64 for float64 gradients), plus float64 work of
    the same size while factorising; refused up front if that cannot fit. To accumulate from chunks
    without holding G (memory about d (B + 32) / 2 numbers whatever m is), use :meth:`from_chunks`.
    """

    def __init__(self, grads: torch.Tensor, damp: float | None = None, block_size: int = 128,
                 relative_damp: float | None = None):
        grads = check_gradients(grads)
        absolute, relative = check_damping(damp, relative_damp)
        block_size = _check_block_size(block_size)
        m, d = grads.shape
        element = torch.empty(0, dtype=compute_dtype(grads.dtype)).element_size()
        resources.check_fits(_peak_bytes(m, d, block_size, element), grads.device,
                             f"a block-diagonal Fisher inverse of {m} gradients of {d:,} coordinates "
                             f"(block_size {block_size})", "lower block_size or the number of gradients")
        self._num_grads, self._dim = m, d
        self._dtype = compute_dtype(grads.dtype)
        self._block_size = min(block_size, d)
        mean_diagonal = float(grads.to(torch.float64).square().sum()) / (max(m, 1) * d) if relative else 0.0
        self._damp = _resolve_damp(mean_diagonal, absolute, relative)
        self._batches: list[_BlockBatch] = []
        self._float64_blocks = 0
        for start, count, width in _batch_layout(d, self._block_size):
            blocks = grads[:, start: start + count * width].reshape(m, count, width).transpose(0, 1)
            factor, route, in_float64 = _factor_blocks(blocks, self._damp, self._dtype)
            self._add_batch(start, count, width, factor, route)
            self._float64_blocks += in_float64

    def _add_batch(self, start, count, width, factor, route, layout=None) -> None:
        """One batch of blocks: ``factor`` (count, r, width), or (count, layout.length) stored as ``layout`` says."""
        if layout is None:
            layout = RowLayout.dense(factor.shape[1], width)
            factor = factor.reshape(count, -1)
        alpha, scale = (0.0, 1.0) if route == "primal" else (1.0 / self._damp, -1.0 / self._damp)
        self._batches.append(_BlockBatch(start, count, width, factor, layout, route, alpha, scale))

    @classmethod
    def from_chunks(cls, chunks: Iterable[torch.Tensor], dim: int, block_size: int, damp: float | None = None,
                    relative_damp: float | None = None, device=None, dtype: torch.dtype = torch.float32,
                    on_rows=None, mask: torch.Tensor | None = None, reduce=None) -> "BlockFisherInverse":
        """Accumulate each block's G_b^T G_b from ``chunks`` of gradient rows, (n_i, dim) each, without
        ever holding the whole (m, d) matrix, then factorise every block in place (primal route).

        Args:
            chunks: an iterable of (n_i, dim) floating tensors on ``device`` (e.g.
                :func:`mfac.grads.gradient_chunks`); m = sum of n_i.
            dim, block_size: d and B.
            damp / relative_damp: as for the constructor (exactly one).
            dtype: accumulation and storage dtype of the statistics: float32 (default) or float64.
            on_rows: optional ``on_rows(n)`` after each chunk (progress).
            mask: optional (dim,) bool tensor; coordinates where it is False count as having zero
                gradient in every row (pruned weights): their rows and columns of the statistics are
                zeroed once before factorising, which equals masking every chunk at a fraction of the
                cost (d * B instead of m * d operations).
            reduce: for rows shared out over processes: a callable that sums a tensor over them in
                place (``mfac.distributed.sum_over``); the statistics and the row count are summed
                before factorising, so every process builds the same inverse.

        Memory: the lower triangle of each block's statistics, packed (:class:`RowLayout`: 10,240
        numbers per block of 128, 0.625 d B in all; about d (B + 32) / 2 in general) in ``dtype``,
        checked against the memory available before anything is allocated; the factors overwrite
        them. Plus one chunk, plus float64 tiles of at most 128 MB while factorising.
        Cost: d B m flops to accumulate in the compiled kernel (the lower triangle of each block's
        sums, which is all the factorisation reads; 2 d B m in batched products where it cannot
        run), 2 d B^2 / 3 to factorise (:mod:`mfac.fisher.block_factor`).
        """
        absolute, relative = check_damping(damp, relative_damp)
        block_size = _check_block_size(block_size)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        device = torch.device(device) if device is not None else torch.empty(0).device
        size = min(block_size, dim)
        element = torch.empty(0, dtype=dtype).element_size()
        layout = _batch_layout(dim, size)
        stored = [RowLayout.lower(width) for _, _, width in layout]
        numbers = sum(count * shape.length for (_, count, _), shape in zip(layout, stored))
        resources.check_fits(numbers * element + 3 * 8 * TILE_ELEMENTS, device,
                             f"streamed block Fisher statistics for {dim:,} coordinates in blocks of {size} "
                             f"({numbers:,} {dtype} numbers)", "lower block_size")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                                 or mask.shape != (dim,)):
            raise ValueError(f"mask must be a bool tensor of shape ({dim},), got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        sums = [torch.zeros((count, shape.length), dtype=dtype, device=device)
                for (_, count, _), shape in zip(layout, stored)]
        m = 0
        iterator = iter(chunks)
        while (chunk := next(iterator, None)) is not None:
            if not isinstance(chunk, torch.Tensor) or chunk.dim() != 2 or chunk.shape[1] != dim:
                shape = tuple(chunk.shape) if isinstance(chunk, torch.Tensor) else type(chunk).__name__
                raise ValueError(f"every chunk must be a tensor of shape (n, {dim}), got {shape}")
            rows = chunk.to(device=device, dtype=dtype)
            if rows.shape[0] == 0:
                continue
            _accumulate(sums, layout, stored, rows)
            m += len(rows)
            if on_rows is not None:
                on_rows(len(rows))
            # Let go of this chunk before the producer computes the next one (two would be alive).
            del chunk, rows
        if reduce is not None:
            for total in sums:
                reduce(total)
            m = int(reduce(torch.tensor([float(m)], dtype=torch.float64, device=device))[0])
        if mask is not None:
            for (start, count, width), shape, total in zip(layout, stored, sums):
                shape.zero_outside(total, mask[start: start + count * width].reshape(count, width))
        self = cls.__new__(cls)
        self._num_grads, self._dim, self._dtype, self._block_size = m, dim, dtype, size
        self._batches, self._float64_blocks = [], 0
        divisor = max(m, 1)
        trace = sum(float(total[:, shape.diagonal(device)].to(torch.float64).sum())
                    for shape, total in zip(stored, sums))
        self._damp = _resolve_damp(trace / (divisor * dim), absolute, relative)
        for (start, count, width), shape, total in zip(layout, stored, sums):
            total.div_(divisor)
            # the factor overwrites the sums, tile by tile
            self._float64_blocks += inverse_cholesky_factors(total, shape, self._damp, total)
            self._add_batch(start, count, width, total, "primal", shape)
        return self

    dim = property(lambda self: self._dim)
    num_grads = property(lambda self: self._num_grads)
    damp = property(lambda self: self._damp, doc="lambda: the absolute damp, or the one relative_damp gave.")
    dtype = property(lambda self: self._dtype)
    device = property(lambda self: self._batches[0].factor.device)
    @property
    def block_size(self) -> int:
        """B, the size of every block but possibly the last."""
        return self._block_size
    nbytes = property(lambda self: sum(b.factor.numel() * b.factor.element_size() for b in self._batches))

    @property
    def float64_blocks(self) -> int:
        """How many primal-route blocks were factorised in float64: all of them for float64 factors
        (or where the compiled kernel cannot run), else those whose float32 factorisation failed the
        residual check (``FLOAT32_RESIDUAL``): a measure of how ill-conditioned the blocks were."""
        return self._float64_blocks

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
            xb = rows[:, b.start: b.stop].reshape(-1, b.count, b.size).transpose(0, 1)
            # One product per band of U's rows, read in place (products written into views of one
            # tensor, or accumulated into them in place, measured 2x slower).
            bands = list(b.bands())
            coeffs = [torch.bmm(xb[:, :, :length], band.transpose(1, 2)).mul_(b.scale) for _, _, length, band in bands]
            yb = xb * b.alpha if b.alpha else torch.zeros_like(xb)
            for (_, _, length, band), part in zip(bands, coeffs):
                yb[:, :, :length] += torch.bmm(part, band)
            out[:, b.start: b.stop] = yb.transpose(0, 1).reshape(-1, b.count * b.size)
        return out.reshape(x.shape)

    def diag(self) -> torch.Tensor:
        parts = []
        for b in self._batches:
            squares = torch.zeros(b.count, b.size, dtype=self._dtype, device=self.device)
            for _, _, length, band in b.bands():
                squares[:, :length] += torch.linalg.vector_norm(band, dim=1).square()
            parts.append(b.alpha + b.scale * squares)
        return torch.cat([p.reshape(-1) for p in parts])

    def element(self, i, j) -> torch.Tensor:
        i, j = self._check_pair(i, j)
        out = torch.zeros(i.shape, dtype=self._dtype, device=self.device)
        for b in self._batches:
            li, lj = i - b.start, j - b.start
            inside = (li >= 0) & (li < b.stop - b.start) & (lj >= 0) & (lj < b.stop - b.start)
            same = inside & (li.div(b.size, rounding_mode="floor") == lj.div(b.size, rounding_mode="floor"))
            li, lj = li[same], lj[same]
            values = torch.empty(li.shape, dtype=self._dtype, device=self.device)
            step = max(1, _SUBMATRIX_BYTES // (2 * max(b.layout.rows, 1) * (self._dtype.itemsize + COLUMN_BYTES)))
            for p0 in range(0, len(li), step):  # the two columns of each pair: (n, r, 2), in pieces
                pi, pj = li[p0: p0 + step], lj[p0: p0 + step]
                pair = b.layout.columns(b.factor, pi // b.size, torch.stack([pi % b.size, pj % b.size], 1))
                products = (pair[:, :, 0] * pair[:, :, 1]).sum(-1)
                values[p0: p0 + step] = b.alpha * (pi == pj).to(self._dtype) + b.scale * products
            out[same] = values
        return out

    def submatrices(self, index) -> torch.Tensor:
        """[F^-1] on each row of ``index`` (n, s): (n, s, s). Entries of different blocks are 0. Rows
        that lie within one block (the usual case in group OBS) take one batched product
        alpha*I + scale * U[:, cols]^T U[:, cols] over just the s columns they need, O(n s^2 r) time
        and n*r*s numbers of memory for factors of r rows (in pieces of about 256 MB); other rows ask
        ``element`` for each pair."""
        index = check_index("index", index, self._dim).to(self.device)
        if index.dim() != 2:
            raise ValueError(f"index must have shape (n, s), got {tuple(index.shape)}")
        widest = max((b.layout.rows for b in self._batches), default=1)
        step = max(1, _SUBMATRIX_BYTES // (max(widest, 1) * index.shape[1] * (self._dtype.itemsize + COLUMN_BYTES)))
        if index.shape[0] > step:
            return torch.cat([self._submatrices(index[i: i + step]) for i in range(0, index.shape[0], step)])
        return self._submatrices(index)

    def _submatrices(self, index: torch.Tensor) -> torch.Tensor:
        n, s = index.shape
        out = torch.zeros(n, s, s, dtype=self._dtype, device=self.device)
        for b in self._batches:
            local = index - b.start
            block = local.div(b.size, rounding_mode="floor")
            inside = ((local >= 0) & (local < b.stop - b.start) & (block == block[:, :1])).all(1)
            if not bool(inside.any()):
                continue
            rows = inside.nonzero()[:, 0]
            columns = b.layout.columns(b.factor, block[rows, 0], local[rows] % b.size)  # (k, r, s): only those needed
            sub = b.scale * columns.transpose(1, 2) @ columns
            sub.diagonal(dim1=1, dim2=2).add_(b.alpha)
            same = (index[rows][:, :, None] == index[rows][:, None, :]).to(sub.dtype)  # repeated coordinates
            out[rows] = sub + b.alpha * (same - torch.eye(s, dtype=sub.dtype, device=self.device))
        crossing = ~self._within_one_block(index)
        if bool(crossing.any()):
            out[crossing] = super().submatrices(index[crossing])
        return out

    def _within_one_block(self, index: torch.Tensor) -> torch.Tensor:
        first = torch.zeros(index.shape[0], dtype=torch.bool, device=self.device)
        for b in self._batches:
            local = index - b.start
            block = local.div(b.size, rounding_mode="floor")
            first |= ((local >= 0) & (local < b.stop - b.start) & (block == block[:, :1])).all(1)
        return first

    def column(self, j: int) -> torch.Tensor:
        j = self._column_index(j)
        out = torch.zeros(self._dim, dtype=self._dtype, device=self.device)
        b = next(b for b in self._batches if b.start <= j < b.stop)
        block, offset = divmod(j - b.start, b.size)
        factor = b.layout.unpack(b.factor[block: block + 1])[0]  # (r, size)
        values = b.scale * (factor.T @ factor[:, offset])
        values[offset] += b.alpha
        first = b.start + block * b.size
        out[first: first + b.size] = values
        return out


class StaticFisherInverse(BlockFisherInverse):
    """Exact, matrix-free F^-1 for a fixed set of gradients (one block covering all d coordinates).

    Args:
        grads: (m, d) floating tensor, one gradient per row.
        damp: lambda > 0 (or None with ``relative_damp``, a fraction of the mean Fisher diagonal).

    When m < d (the usual case) this is the M-FAC static algorithm: setup O(d m^2 + m^3), then
    ``ihvp`` O(d m), ``element`` O(m), ``column`` and ``diag`` O(d m), memory d*m numbers.
    When d <= m it factors the d x d matrix instead, which is both cheaper and better conditioned.
    """

    def __init__(self, grads: torch.Tensor, damp: float | None = None, relative_damp: float | None = None):
        grads = check_gradients(grads)
        super().__init__(grads, damp, block_size=grads.shape[1], relative_damp=relative_damp)
