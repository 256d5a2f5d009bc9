"""The compressed sliding window: M-FAC over sparsified gradients with error feedback (EFCP).

Modoranu et al. (2023), "Error Feedback Can Accurately Compress Preconditioners": a window of m
gradients of d coordinates is the optimizer's whole state (m * d * 4 bytes in float32: 93 GB for
m = 1024 on MiniLM-L6). Keeping only the largest 1% of each gradient's entries makes it 100x
smaller, and error feedback makes the loss harmless: what a gradient leaves out is kept in a
residual and added to the next one, so every coordinate's mass enters the window eventually.

For each gradient g pushed:

    a <- g + residual
    c <- the largest density * block entries of |a| in every block of ``block`` coordinates
    residual <- a - c          (c as stored: values rounded to the storage dtype, if bfloat16)
    window <- c                (replaces the oldest row)

and ``push_ihvp`` returns F^-1 c, with F = damp*I + C^T C / k over the compressed rows C held,
as the EFCP optimizer does (it preconditions the compressed gradient). ``ihvp(x)`` is the exact
F^-1 x over those rows for any x: the algebra is that of :class:`SlidingWindowFisherInverse`; only
the storage form (:class:`CompressedRows`) differs.

Storage: every row holds the same number of entries in each block (a top-k per block, not over
the whole vector), as (value, int16 offset within the block) pairs, so a row costs
nnz * (2 + 4) bytes in float32 or nnz * (2 + 2) in bfloat16, nnz = sum over blocks of
ceil(density * block size). The entries are stored block-major (:class:`mfac.kernels.BlockLayout`):
a product (:mod:`mfac.kernels`) reads each block's entries of all rows as one contiguous run while
that block of x, or of the result, stays in cache (measured in
BENCHMARKS.md#compressed-window-at-the-size-of-minilm-l6).
"""

from __future__ import annotations

import torch

from .. import kernels, resources
from .base import NonFiniteGradientError, all_finite, check_positive_int
from .rows import StagedBatch
from .window import GRAM_COPIES, SlidingWindowFisherInverse

__all__ = ["CompressedWindowFisherInverse", "CompressedRows", "compressed_nbytes", "check_density"]

MAX_BLOCK = 32768  # offsets within a block must fit an int16
DEFAULT_BLOCK = 8192  # 32 KB of float32 x per block: stays in L1/L2 cache while a block's entries stream by


def check_density(density) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < float(density) <= 1:
        raise ValueError(f"density must be a number in (0, 1] (the fraction of each gradient's entries kept, "
                         f"e.g. 0.01), got {density!r}")
    return float(density)


def compressed_nbytes(dim: int, window: int, density: float, dtype: torch.dtype = torch.float32,
                      block: int = DEFAULT_BLOCK) -> int:
    """Bytes a CompressedWindowFisherInverse holds at its peak: its rows
    (:meth:`CompressedRows.nbytes_for`) plus 6 m x m float64 matrices."""
    return CompressedRows.nbytes_for(dim, window, density, dtype, block) + GRAM_COPIES * window * window * 8


class CompressedRows:
    """Storage form of a compressed window (see :mod:`mfac.fisher.rows` for the protocol): per row,
    the top ``density`` of every block of ``block`` coordinates of g + residual, as values in
    ``dtype`` (float32 or bfloat16) and int16 offsets, laid out block-major; and the (d,) float32
    error-feedback residual.

    Memory: capacity * nnz * (value bytes + 2) + 3 d float32 + (3 nnz + blocks + 1) int64 (:meth:`nbytes_for`).
    """

    def __init__(self, dim: int, capacity: int, density: float, dtype: torch.dtype, device: torch.device,
                 block: int):
        self.dim, self.capacity, self.density, self.block = dim, capacity, density, block
        self.storage_dtype, self.dtype, self.device = dtype, torch.float32, device
        resources.check_fits(self.nbytes_for(dim, capacity, density, dtype, block), device,
                             f"a compressed window of {capacity} gradients of {dim:,} coordinates at density "
                             f"{density:g} in {dtype}", "lower window or density")
        self.layout = kernels.BlockLayout.build(dim, density, block, capacity, device)
        size = capacity * self.layout.nnz
        self._values = torch.zeros(size, dtype=dtype, device=device)
        self._offsets = torch.zeros(size, dtype=torch.int16, device=device)
        self._residual = torch.zeros(dim, dtype=torch.float32, device=device)
        # (d,) float32 buffers a push no longer needs (the residual it replaced, its dense row),
        # reused by the next encode: a fresh one costs a page fault per 4 KB on first touch, as
        # much as the compression itself at transformer size.
        self._spare: list[torch.Tensor] = []

    @staticmethod
    def nbytes_for(dim: int, capacity: int, density: float, dtype: torch.dtype, block: int) -> int:
        """Bytes of the rows' values and offsets, the residual and two spare dense vectors (float32),
        and the layout's index tables, from the layout's own entry count."""
        nnz = kernels.BlockLayout.entries(dim, density, block)
        return capacity * nnz * (dtype.itemsize + 2) + dim * 4 + CompressedRows.unsaved_nbytes_for(dim, density, block)

    @staticmethod
    def unsaved_nbytes_for(dim: int, density: float, block: int) -> int:
        """Bytes held but never saved in a state: the two spare dense vectors (float32) and the
        layout's index tables, rebuilt from the settings."""
        nnz = kernels.BlockLayout.entries(dim, density, block)
        return 2 * dim * 4 + 3 * nnz * 8 + (-(-dim // block) + 1) * 8

    @property
    def nbytes(self) -> int:
        layout = self.layout
        tensors = (self._values, self._offsets, self._residual, layout.starts, layout.bases, layout.first, layout.kept,
                   *self._spare)
        return sum(t.numel() * t.element_size() for t in tensors)

    nnz = property(lambda self: self.layout.nnz, doc="Entries kept of every gradient.")
    residual = property(lambda self: self._residual.clone(), doc="The error-feedback vector (d,), float32.")
    diag_chunk = property(lambda self: self.block, doc="Columns per chunk of ``diag``: one block.")

    def _runs(self, flat: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Views of a block-major (capacity * nnz,) tensor as (blocks, capacity, kept) runs: one for
        the blocks of ``block`` coordinates, one for a shorter last block; with each run's first block."""
        starts, blocks = self.layout.starts, self.layout.starts.numel() - 1
        full = self.dim // self.block
        runs, done = [], 0
        for first, count in ((0, full), (full, blocks - full)):
            if count:
                kept = int(starts[first + 1] - starts[first])
                size = count * self.capacity * kept
                runs.append((first, flat[done: done + size].view(count, self.capacity, kept)))
                done += size
        return runs

    # Compression ------------------------------------------------------------------------------------

    def _compress(self, accumulated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top entries of every block of ``accumulated`` (d,) float32: returns (values in the storage
        dtype, int16 offsets, the dense (d,) float32 vector of the values as stored)."""
        full = (self.dim // self.block) * self.block
        offsets, values = [], []
        starts = self.layout.starts.tolist()
        if full:
            blocks = accumulated[:full].view(-1, self.block)
            index = blocks.abs().topk(starts[1] - starts[0], dim=1, sorted=False).indices
            values.append(blocks.gather(1, index).reshape(-1))
            offsets.append(index.reshape(-1))
        if full < self.dim:
            tail = accumulated[full:]
            index = tail.abs().topk(starts[-1] - starts[-2], sorted=False).indices
            values.append(tail[index])
            offsets.append(index)
        values = torch.cat(values).to(self.storage_dtype)
        offsets = torch.cat(offsets)
        stored = torch.zeros(self.dim, dtype=torch.float32, device=self.device)
        stored[offsets + self.layout.bases] = values.float()
        return values, offsets.to(torch.int16), stored

    def _buffers(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Two spare (d,) float32 buffers for encode's outputs, neither sharing g's memory (a caller
        may pass back the dense row of a spent push); None if there are not two."""
        memory = g.untyped_storage().data_ptr()
        if len(self._spare) < 2 or any(t.untyped_storage().data_ptr() == memory for t in self._spare):
            return None
        stored, residual = self._spare
        self._spare = []
        return stored, residual

    def encode(self, g: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        g32 = g.to(torch.float32).contiguous()
        out = self._buffers(g32)
        compressed = kernels.compress_blocks(self.layout, self._residual, g32, self.storage_dtype, out)
        if compressed is not None and compressed[0] is None:  # one pass over d, the finiteness checks included
            _, values, offsets, stored, residual = compressed
            return stored, (values, offsets, residual, stored)
        if out is not None:
            self._spare.extend(out)
        if compressed is not None and all_finite(g):  # the kernel found the sum non-finite, not g
            raise NonFiniteGradientError("g plus the error-feedback residual overflows float32; scale the loss "
                                         "down or clip gradients; the window was left unchanged")
        # A NaN would be kept by top-k or hidden in the residual: refuse non-finite input first.
        if not all_finite(g):
            raise NonFiniteGradientError("g contains NaN or Inf; non-finite gradients cannot enter the window, "
                                         "which was left unchanged")
        accumulated = self._residual + g.to(torch.float32)
        if not all_finite(accumulated):
            raise NonFiniteGradientError("g plus the error-feedback residual overflows float32; scale the loss down "
                                         "or clip gradients; the window was left unchanged")
        values, offsets, stored = self._compress(accumulated)
        return stored, (values, offsets, accumulated.sub_(stored), stored)

    def write(self, slot: int, payload: tuple) -> None:
        """Store a staged row, once; its dense copy and the residual it replaces become spares."""
        values, offsets, residual, stored = payload
        positions = self.layout.positions(torch.tensor([slot], device=self.device))[0]
        self._values[positions] = values
        self._offsets[positions] = offsets
        self._spare = [self._residual, stored]
        self._residual = residual

    # Products ---------------------------------------------------------------------------------------

    def dots(self, vectors: torch.Tensor, rows: int) -> torch.Tensor:
        if vectors.dim() == 2 and vectors.shape[1] == 0:
            return torch.zeros(rows, 0, dtype=torch.float64, device=self.device)
        columns = vectors if vectors.dim() == 2 else vectors[:, None]
        out = torch.stack([kernels.sparse_dots(self.layout, self._values, self._offsets, rows,
                                               column.to(torch.float32).contiguous())
                           for column in columns.unbind(1)], 1)
        return out if vectors.dim() == 2 else out[:, 0]

    def combine(self, vectors: torch.Tensor, coeffs: torch.Tensor, beta: float, alpha: float,
                rows: int) -> torch.Tensor:
        if vectors.dim() == 1:
            return kernels.sparse_combine(self.layout, self._values, self._offsets, rows, coeffs,
                                          vectors.to(torch.float32).contiguous(), beta, alpha)
        if vectors.shape[1] == 0:
            return vectors.to(torch.float32) * beta
        return torch.stack([kernels.sparse_combine(self.layout, self._values, self._offsets, rows, part,
                                                   column.to(torch.float32).contiguous(), beta, alpha)
                            for column, part in zip(vectors.unbind(1), coeffs.unbind(1))], 1)

    def _decode_block(self, block: int, rows: int) -> torch.Tensor:
        """Block ``block`` of the first ``rows`` rows, dense: (rows, block size) float32."""
        size = min(self.block, self.dim - block * self.block)
        values, offsets = self._run_of(self._values, block)[:rows], self._run_of(self._offsets, block)[:rows]
        out = torch.zeros(rows, size, dtype=torch.float32, device=self.device)
        out.scatter_(1, offsets.long(), values.float())
        return out

    def _run_of(self, flat: torch.Tensor, block: int) -> torch.Tensor:
        """Block ``block``'s entries of every slot, (capacity, kept), a view of ``flat``."""
        for first, run in reversed(self._runs(flat)):
            if block >= first:
                return run[block - first]
        raise IndexError(block)

    def columns(self, index: torch.Tensor, rows: int) -> torch.Tensor:
        """G[:, index] over the first ``rows`` rows, float64; decodes each block touched (rows * block
        float32 numbers at a time)."""
        out = torch.empty(rows, index.numel(), dtype=torch.float64, device=self.device)
        blocks = torch.div(index, self.block, rounding_mode="floor")
        for block in torch.unique(blocks).tolist():
            picked = (blocks == block).nonzero()[:, 0]
            out[:, picked] = self._decode_block(block, rows)[:, index[picked] - block * self.block].double()
        return out

    def stage_batch(self, grads: torch.Tensor, pushed: int, gram: torch.Tensor, reduce) -> StagedBatch:
        """Error feedback chains the rows, so they are compressed and written one at a time (each
        read against the rows before it: O(n k nnz)); a failure restores the rows as they were."""
        saved = (self._values.clone(), self._offsets.clone(), self._residual.clone())
        gram = gram.clone()
        try:
            for row in grads:
                stored, payload = self.encode(row)
                slot, k = pushed % self.capacity, min(pushed + 1, self.capacity)
                dots = self.dots(stored, k)
                dots[slot] = (stored @ stored).to(torch.float64)
                dots = reduce(dots)
                if not all_finite(dots):
                    raise NonFiniteGradientError("grads are finite but their dot products overflow float32; scale "
                                                 "them down; the window was left unchanged")
                self.write(slot, payload)
                gram[slot, :k] = dots
                gram[:k, slot] = dots
                pushed += 1
        except BaseException:
            self._values, self._offsets, self._residual = saved
            raise
        k = min(pushed, self.capacity)
        return StagedBatch(gram[:k, :k], None, lambda: None)

    # Checkpoint schema ------------------------------------------------------------------------------

    def settings(self) -> dict:
        return {"density": self.density, "block": self.block}

    def tensor_spec(self) -> dict:
        size = self.capacity * self.layout.nnz
        return {"values": ((size,), self.storage_dtype), "offsets": ((size,), torch.int16),
                "residual": ((self.dim,), torch.float32)}

    def state_tensors(self) -> dict:
        return {"values": self._values.clone(), "offsets": self._offsets.clone(), "residual": self._residual.clone()}

    def check_state(self, tensors: dict, k: int) -> None:
        """Offsets index memory in the kernels: each must lie inside its block, and no row may name a
        coordinate twice (``diag`` and ``column`` would then disagree on it); nothing beyond k rows."""
        for first, run in self._runs(tensors["offsets"]):
            size = min(self.block, self.dim - first * self.block)  # a shorter last block has a run of its own
            if bool((run < 0).any()) or bool((run >= size).any()):
                raise ValueError("window state's offsets fall outside their blocks; the file is corrupt or was not "
                                 "written by state_dict()")
            ordered = run[:, :k].sort(dim=-1).values
            if ordered.shape[-1] > 1 and bool((ordered[..., 1:] == ordered[..., :-1]).any()):
                raise ValueError("window state's offsets repeat a coordinate within a row; the file is corrupt or "
                                 "was not written by state_dict()")
        if any(bool(run[:, k:].any()) for key in ("values", "offsets") for _, run in self._runs(tensors[key])):
            raise ValueError(f"window state holds rows beyond the {k} gradients that its pushed count implies")

    def row_norms(self, tensors: dict, k: int) -> torch.Tensor:
        return sum(run[:, :k].double().square().sum((0, 2)) for _, run in self._runs(tensors["values"]))

    def load(self, tensors: dict) -> None:
        self._values.copy_(tensors["values"])
        self._offsets.copy_(tensors["offsets"])
        self._residual.copy_(tensors["residual"])


class CompressedWindowFisherInverse(SlidingWindowFisherInverse):
    """F^-1 over the last ``window`` gradients, each compressed to ``density`` of its entries with
    error feedback (EFCP): a :class:`SlidingWindowFisherInverse` whose rows are stored as
    :class:`CompressedRows`.

    Args:
        dim: d, the length of every gradient; must exceed ``window`` (for smaller models the dense
            window costs no more: use it).
        window: m, how many compressed gradients are kept.
        damp: lambda > 0.
        density: fraction of each gradient's entries kept, in (0, 1]: ceil(density * block size)
            entries of every block of ``block`` coordinates.
        dtype: storage dtype of the kept values, float32 or bfloat16; products accumulate and
            results come back in float32.
        device: where the window lives.
        block: coordinates per block, 1 <= block <= 32768 (default 8192, or d if smaller).

    Methods as the dense window, with these meanings:
        ``push(g)``: a = g + residual; the top entries of a enter the window; the rest becomes the
        new residual. ``push_ihvp(g)``: the same, then F^-1 c for c the compressed gradient
        that entered. ``ihvp(x)``, ``diag``, ``element``: exact for F over the compressed rows.
        ``residual``: the (d,) float32 error-feedback vector.

    Memory: window * nnz * (value bytes + 2) plus 3 d float32 and 5 window^2 float64 numbers, with
    nnz ~ density * d (:func:`compressed_nbytes`); refused up front if it cannot fit.
    Cost per push: two reads of the stored entries (G x and G^T a, compiled kernels when
    available), a top-k per block over d entries, and O(window^3 / 3) for the factor.
    """

    def __init__(self, dim: int, window: int, damp: float, density: float, dtype: torch.dtype = torch.float32,
                 device=None, block: int = DEFAULT_BLOCK):
        dim = check_positive_int("dim", dim)
        window = check_positive_int("window", window)
        density = check_density(density)
        block = check_positive_int("block", block)
        if block > MAX_BLOCK:
            raise ValueError(f"block must be at most {MAX_BLOCK} (offsets within a block are int16), got {block}")
        if dim <= window:
            raise ValueError(f"a compressed window needs dim > window, got dim = {dim} and window = {window}; for a "
                             f"model this small the dense SlidingWindowFisherInverse costs no more: use it")
        if dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"dtype must be torch.float32 or torch.bfloat16 for a compressed window, got {dtype!r}")
        device = torch.device(device) if device is not None else torch.empty(0).device
        storage = CompressedRows(dim, window, density, dtype, device, min(block, dim))
        super().__init__(dim, window, damp, dtype=dtype, device=device, storage=storage)

    density = property(lambda self: self.storage.density, doc="Fraction of each gradient's entries kept.")
    block = property(lambda self: self.storage.block, doc="Coordinates per block of the per-block top-k.")
    nnz = property(lambda self: self.storage.nnz, doc="Entries kept of every gradient.")
    residual = property(lambda self: self.storage.residual, doc="The error-feedback vector (d,), float32.")
