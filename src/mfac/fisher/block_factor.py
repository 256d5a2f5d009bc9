"""The factorisation behind every block-diagonal inverse on its primal route: U = L^-1 of many small
damped Gram matrices A = L L^T (blocks of B <= 256 coordinates, tens of thousands of them for a
transformer), at matrix-product speed.

LAPACK factorises such blocks one at a time at 5-10 GFLOP/s: its per-call overhead and unblocked
loops dominate at that size. The compiled kernel (:func:`mfac.kernels.inverse_factors`) does the
Cholesky factorisation and the triangular inverse of each block in cache, in register-blocked
panels, in float32 or float64, and measures each result: the residual |U A U^T z - z| for a fixed
unit probe z, about eps * cond(A). That measurement chooses the precision: float32 factors keep a
block's float32 factorisation where the residual is at most FLOAT32_RESIDUAL, and redo the rest in
float64. Where the kernel cannot run (GPU tensors, no C compiler), every block is factorised in
float64 by LAPACK, with eigenvalue repair for blocks that round-off made look indefinite
(:func:`mfac.fisher.base.robust_cholesky`). Measured: BENCHMARKS.md#streamed-block-statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import kernels
from .base import robust_cholesky

__all__ = ["FLOAT32_RESIDUAL", "TILE_ELEMENTS", "PACKED_ROW_MULTIPLE", "COLUMN_BYTES", "RowLayout",
           "inverse_cholesky_factors"]

# Largest probe residual |U A U^T z - z| for which a block's float32 factorisation is kept (about
# eps * cond(A): float32 for blocks with condition numbers up to about 1e4, float64 beyond).
FLOAT32_RESIDUAL = 1e-3
# float64 elements per temporary tile while factorising: bounds the extra memory to 128 MiB.
TILE_ELEMENTS = 1 << 24
# Packed lower triangles keep row i's first i + 1 entries rounded up to this many: whole 128-byte
# tiles of float32 for the accumulation kernel, which updates the triangle in such tiles.
PACKED_ROW_MULTIPLE = 32


COLUMN_BYTES = 9  # bytes per entry RowLayout.columns holds besides the values: an int64 place, a flag


@dataclass(frozen=True)
class RowLayout:
    """Where the rows of each stored block lie: blocks of ``rows`` x ``size`` numbers are kept as
    (count, length) tensors, row i at entries starts[i] .. starts[i + 1], holding the row's first
    starts[i + 1] - starts[i] columns (the others are zero, or not read).

    Two layouts: :meth:`dense` (every column of every row: a plain (rows, size) matrix) and
    :meth:`lower`, the lower triangle of a square block packed by rows, row i holding its first
    min(size, i + 1 rounded up to PACKED_ROW_MULTIPLE) columns: 10,240 numbers for B = 128 against
    16,384 (62.5%; the padding keeps rows in whole tiles for the compiled kernels). Symmetric
    statistics and triangular factors need no more."""

    rows: int
    size: int
    starts: torch.Tensor = field(repr=False)  # (rows + 1,) int64, on the CPU

    @classmethod
    def dense(cls, rows: int, size: int) -> "RowLayout":
        return cls(rows, size, torch.arange(rows + 1, dtype=torch.int64) * size)

    @classmethod
    def lower(cls, size: int) -> "RowLayout":
        multiple = PACKED_ROW_MULTIPLE
        lengths = torch.clamp((torch.arange(size) // multiple + 1) * multiple, max=size)
        return cls(size, size, torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]))

    @property
    def length(self) -> int:
        """Numbers stored per block."""
        return int(self.starts[-1])

    @property
    def is_dense(self) -> bool:
        return self.length == self.rows * self.size

    def bands(self) -> list[tuple[int, int, int, int]]:
        """(first row, end row, row length, first entry) of each run of rows of equal length: a band
        of rows is a plain (rows, length) matrix in storage (one band in the dense layout, at most
        size / PACKED_ROW_MULTIPLE + 1 in the packed one)."""
        starts = self.starts.tolist()
        out = []
        for i in range(self.rows):
            length = starts[i + 1] - starts[i]
            if out and out[-1][2] == length:
                out[-1] = (out[-1][0], i + 1, length, out[-1][3])
            else:
                out.append((i, i + 1, length, starts[i]))
        return out

    def band_views(self, stored: torch.Tensor):
        """(first row, end row, row length, view) for each band of ``stored`` ((k, length) storage):
        the view is that band of every block, (k, end - first, row length), in place."""
        for first, end, length, entry in self.bands():
            band = stored[:, entry: entry + (end - first) * length]
            yield first, end, length, band.unflatten(1, (end - first, length))

    def diagonal(self, device=None) -> torch.Tensor:
        """(min(rows, size),) int64: where each diagonal entry is stored."""
        i = torch.arange(min(self.rows, self.size))
        return (self.starts[i] + i).to(device)

    def unpack(self, stored: torch.Tensor) -> torch.Tensor:
        """(k, rows, size) blocks from their (k, length) storage, zeros where nothing is stored (a
        view for the dense layout). Memory: k * rows * size numbers."""
        k = stored.shape[0]
        if self.is_dense:
            return stored.reshape(k, self.rows, self.size)
        out = stored.new_zeros((k, self.rows, self.size))
        for first, end, length, band in self.band_views(stored):
            out[:, first:end, :length] = band
        return out

    def pack(self, blocks: torch.Tensor) -> torch.Tensor:
        """(k, length) storage of (k, rows, size) blocks: their stored entries."""
        k = blocks.shape[0]
        if self.is_dense:
            return blocks.reshape(k, -1)
        out = blocks.new_empty((k, self.length))
        for first, end, length, band in self.band_views(out):
            band.copy_(blocks[:, first:end, :length])
        return out

    def zero_outside(self, stored: torch.Tensor, keep: torch.Tensor) -> None:
        """Zero, in place, the rows and columns of square blocks ((count, length) storage) where
        ``keep`` ((count, size) bool) is False: a band of rows at a time, no temporary."""
        keep = keep.to(device=stored.device, dtype=stored.dtype)
        for first, end, length, band in self.band_views(stored):
            band.mul_(keep[:, first:end, None]).mul_(keep[:, None, :length])

    def columns(self, stored: torch.Tensor, block: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
        """(k, rows, s): columns ``column`` ((k, s) int64) of blocks ``block`` ((k,) int64) of
        ``stored`` (count, length), gathering only those k * rows * s numbers. Memory: k * rows * s
        times (8 + 1 + the value's bytes) at the peak (COLUMN_BYTES: the places, which are not
        stored, and the values)."""
        starts = self.starts.to(stored.device)
        place = starts[:-1][None, :, None] + column[:, None, :]
        place.add_(block[:, None, None] * self.length)
        if self.is_dense:
            return stored.reshape(-1)[place]
        outside = column[:, None, :] >= starts.diff()[None, :, None]
        values = stored.reshape(-1)[place.masked_fill_(outside, 0)]
        del place
        return values.masked_fill_(outside, 0)


def _probe(size: int) -> torch.Tensor:
    """A fixed pseudo-random unit vector of ``size`` float64 numbers: the same probe every run."""
    z = torch.randn(size, dtype=torch.float64, generator=torch.Generator().manual_seed(size))
    return z / z.norm()


def _float64_factors(matrices: torch.Tensor, damp: float, probe: torch.Tensor) -> torch.Tensor:
    """U = L^-1 of each damped (n, B, B) float64 matrix, in place: by the compiled kernel where it
    runs, else (and for blocks round-off made look indefinite) by LAPACK with eigenvalue repair."""
    result = kernels.inverse_factors(matrices, probe)
    failed = None if result is None else (result[0] != 0).to(matrices.device)
    if failed is None or bool(failed.any()):
        bad = matrices if failed is None else matrices[failed]  # failed blocks are left as they were
        eye = torch.eye(bad.shape[-1], dtype=torch.float64, device=bad.device)
        factors = torch.linalg.solve_triangular(robust_cholesky(bad, damp), eye.expand_as(bad), upper=False)
        if failed is None:
            matrices.copy_(factors)
        else:
            matrices[failed] = factors
    return matrices


def inverse_cholesky_factors(fisher: torch.Tensor, layout: RowLayout, damp: float, out: torch.Tensor) -> int:
    """Write U = L^-1 of each damped block Gram matrix (already divided by m; (nb, layout.length),
    lower triangle stored) into ``out`` (the same shape; may be ``fisher`` itself), in tiles of
    blocks that bound the work memory. Returns how many blocks were factorised in float64.

    Precision follows the measured conditioning. For float32 factors each block is factorised in
    float32 (compiled kernel) and kept if its probe residual |U A U^T z - z| (float64) is at most
    FLOAT32_RESIDUAL: the residual of a Cholesky-based inverse is about eps * cond(A), so blocks that
    are well conditioned stay in float32 and the others (and any that round-off made look
    indefinite) are redone in float64 from the statistics as given. float64 factors, and every block
    where the kernel cannot run (GPU, no compiler), are factorised in float64.
    """
    nb, size = fisher.shape[0], layout.size
    per_tile = max(1, TILE_ELEMENTS // (size * size))
    probe = _probe(size).to(fisher.device)
    diagonal = layout.diagonal(fisher.device)
    in_place = fisher.data_ptr() == out.data_ptr()
    in_float64 = 0
    for b0 in range(0, nb, per_tile):
        source, target = fisher[b0: b0 + per_tile], out[b0: b0 + per_tile]
        if not in_place:
            target.copy_(source)
        target[:, diagonal] += damp
        if out.dtype == torch.float64:  # float64 factors (of float64 statistics): in place
            factors = _float64_factors(layout.unpack(target), damp, probe)
            if not layout.is_dense:  # unpack made a copy; a dense layout's was a view of target
                target.copy_(layout.pack(factors))
            in_float64 += len(target)
            continue
        result = kernels.inverse_factors(target, probe, FLOAT32_RESIDUAL, starts=layout.starts)
        redo = slice(None) if result is None else ~(result[1] <= FLOAT32_RESIDUAL).to(target.device)
        if result is not None and not bool(redo.any()):
            continue
        if source.dtype == torch.float64:  # the float64 statistics, not their float32 rounding
            matrices = layout.unpack(source[redo]).clone()
            matrices.diagonal(dim1=1, dim2=2).add_(damp)
        else:
            # damped already; the kernel left these as they were
            matrices = layout.unpack(target[redo]).to(torch.float64)
        target[redo] = layout.pack(_float64_factors(matrices, damp, probe)).to(out.dtype)
        in_float64 += len(matrices)
    return in_float64
