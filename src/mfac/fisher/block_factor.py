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

import torch

from .. import kernels
from .base import robust_cholesky

__all__ = ["FLOAT32_RESIDUAL", "TILE_ELEMENTS", "inverse_cholesky_factors"]

# Largest probe residual |U A U^T z - z| for which a block's float32 factorisation is kept (about
# eps * cond(A): float32 for blocks with condition numbers up to about 1e4, float64 beyond).
FLOAT32_RESIDUAL = 1e-3
# float64 elements per temporary tile while factorising: bounds the extra memory to 128 MiB.
TILE_ELEMENTS = 1 << 24


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


def inverse_cholesky_factors(fisher: torch.Tensor, damp: float, out: torch.Tensor) -> int:
    """Write U = L^-1 of each damped (nb, B, B) block Gram matrix (already divided by m) into ``out``
    (which may be ``fisher`` itself), in tiles of blocks that bound the work memory. Returns how many
    blocks were factorised in float64.

    Precision follows the measured conditioning. For float32 factors each block is factorised in
    float32 (compiled kernel) and kept if its probe residual |U A U^T z - z| (float64) is at most
    FLOAT32_RESIDUAL: the residual of a Cholesky-based inverse is about eps * cond(A), so blocks that
    are well conditioned stay in float32 and the others (and any that round-off made look
    indefinite) are redone in float64 from the statistics as given. float64 factors, and every block
    where the kernel cannot run (GPU, no compiler), are factorised in float64.
    """
    nb, size, _ = fisher.shape
    per_tile = max(1, TILE_ELEMENTS // (size * size))
    probe = _probe(size).to(fisher.device)
    in_place = fisher.data_ptr() == out.data_ptr()
    in_float64 = 0
    for b0 in range(0, nb, per_tile):
        source, target = fisher[b0: b0 + per_tile], out[b0: b0 + per_tile]
        if not in_place:
            target.copy_(source)
        target.diagonal(dim1=1, dim2=2).add_(damp)
        if out.dtype == torch.float64:  # float64 factors (of float64 statistics): in place
            _float64_factors(target, damp, probe)
            in_float64 += len(target)
            continue
        result = kernels.inverse_factors(target, probe, FLOAT32_RESIDUAL)
        redo = slice(None) if result is None else ~(result[1] <= FLOAT32_RESIDUAL).to(target.device)
        if result is not None and not bool(redo.any()):
            continue
        if source.dtype == torch.float64:  # the float64 statistics, not their float32 rounding
            matrices = source[redo].clone()
            matrices.diagonal(dim1=1, dim2=2).add_(damp)
        else:
            matrices = target[redo].to(torch.float64)  # damped already; the kernel left these as they were
        target[redo] = _float64_factors(matrices, damp, probe).to(out.dtype)
        in_float64 += len(matrices)
    return in_float64
