"""Group OBS: the saliency of removing a set of weights at once, and the update of the survivors.

For a set Q of coordinates (one structure, or several), with E_Q the columns of the identity at Q:

    saliency   rho_Q = 1/2 * w_Q^T ([F^-1]_QQ)^-1 w_Q
    update     dw    = -F^-1 E_Q ([F^-1]_QQ)^-1 w_Q        (then w_Q = 0 exactly)

|Q| = 1 gives the single-weight OBS formulas. Both work over any Fisher-inverse object through its
public protocol: ``submatrices`` gives [F^-1]_QQ, ``block_size`` says which coordinates it couples
(a block-diagonal inverse makes [F^-1]_QQ block-diagonal, so each structure's saliency is a sum
over the blocks it meets, each a small dense solve), and ``ihvp`` applies the update.

The small systems are solved in float64 by Cholesky (a principal submatrix of an SPD matrix is
SPD; one that round-off made indefinite is repaired by :func:`mfac.fisher.base.robust_cholesky`),
batched by size, in chunks of at most ``_CHUNK_ENTRIES`` float64 entries.
"""

from __future__ import annotations

import torch

from ..fisher.base import robust_cholesky

__all__ = ["Runs", "saliencies", "update"]

_CHUNK_ENTRIES = 1 << 24  # float64 entries of submatrices per batch: 128 MiB


def _solve_spd(matrices: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """(n, s, s) SPD float64 systems times (n, s) right-hand sides."""
    lower = robust_cholesky(matrices, torch.finfo(torch.float64).tiny)
    return torch.cholesky_solve(rhs[:, :, None], lower)[:, :, 0]


class Runs:
    """The structures' coordinates cut by the inverse's coupling blocks: each run is the part of one
    structure inside one block of ``block_size`` coordinates, and [F^-1]_QQ of a structure is the
    direct sum of its runs' submatrices. Built once per prune from ``coords`` (N,) and ``owner`` (N,)
    (structure j owns coordinate coords[i] when owner[i] == j; a coordinate may have two owners)."""

    def __init__(self, coords: torch.Tensor, owner: torch.Tensor, block_size: int):
        order = torch.argsort(coords, stable=True)
        coords, owner = coords[order], owner[order]
        order = torch.argsort(owner * (coords.max() // block_size + 1) + coords // block_size, stable=True)
        self.coords, self.owner = coords[order], owner[order]
        key = self.owner * (coords.max() // block_size + 1) + self.coords // block_size
        starts = torch.ones_like(key, dtype=torch.bool)
        starts[1:] = key[1:] != key[:-1]
        self.starts = starts.nonzero()[:, 0]
        self.lengths = torch.diff(self.starts, append=torch.tensor([key.numel()], device=key.device))
        self.block_size = block_size

    def by_length(self):
        """(run owners (n,), coordinate index (n, length)) for every run length present."""
        for length in torch.unique(self.lengths).tolist():
            picked = self.starts[self.lengths == length]
            index = picked[:, None] + torch.arange(length, device=picked.device)
            yield self.owner[picked], self.coords[index]


def saliencies(finv, weights: torch.Tensor, runs: Runs, count: int) -> torch.Tensor:
    """rho for each of ``count`` structures, (count,) float64, for ``weights`` (d,) and an inverse
    Fisher ``finv`` over the same d coordinates. Cost: one s x s factorisation per run of s
    coordinates, O(sum of s^3) plus the submatrices."""
    out = torch.zeros(count, dtype=torch.float64, device=weights.device)
    w = weights.to(torch.float64)
    for owners, index in runs.by_length():
        step = max(1, _CHUNK_ENTRIES // index.shape[1] ** 2)
        for start in range(0, index.shape[0], step):
            part = index[start: start + step]
            matrices = finv.submatrices(part).to(torch.float64)
            values = w[part]
            solved = _solve_spd(matrices, values)
            out.index_add_(0, owners[start: start + step], 0.5 * (values * solved).sum(1))
    return out


def update(finv, weights: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """dw = -F^-1 E_Q ([F^-1]_QQ)^-1 w_Q for the coordinates Q where ``removed`` (d,) is True: the
    group OBS update of removing them all at once (exact for the union, block by block). Returns
    the (d,) change in ``weights``' dtype; it moves the removed coordinates to zero (up to round-off)."""
    coords = removed.nonzero()[:, 0]
    rhs = torch.zeros(weights.shape[0], dtype=torch.float64, device=weights.device)
    if coords.numel() == 0:
        return torch.zeros_like(weights)
    blocks = coords // finv.block_size
    unique, counts = torch.unique_consecutive(blocks, return_counts=True)
    firsts = torch.cumsum(counts, 0) - counts
    w = weights.to(torch.float64)
    for size in torch.unique(counts).tolist():  # blocks with the same number of removed coordinates together
        picked = (counts == size).nonzero()[:, 0]
        step = max(1, _CHUNK_ENTRIES // size ** 2)
        for start in range(0, picked.numel(), step):
            index = coords[firsts[picked[start: start + step]][:, None] + torch.arange(size, device=coords.device)]
            matrices = finv.submatrices(index).to(torch.float64)
            rhs[index] = _solve_spd(matrices, w[index])
    del unique
    return -finv.ihvp(rhs.to(finv.dtype)).to(weights.dtype)
