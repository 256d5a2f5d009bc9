"""How a sliding window stores its gradients: the storage forms behind one small protocol.

A :class:`mfac.fisher.SlidingWindowFisherInverse` owns the Woodbury algebra (the float64 Gram
matrix, its factor, staging and committing pushes); everything that depends on how the k rows
G (k, d) are stored lives in a storage form with these public methods:

* ``encode(g) -> (stored, payload)``: g as the window will hold it, dense (d,) in the compute dtype,
  and what ``write`` stores for it. Nothing of the state changes; the form may encode into buffers
  it kept from the last ``write`` (a push dropped after encode then just costs fresh ones).
* ``write(slot, payload)``: store a staged row.
* ``dots(vectors, rows)``: G x over the first ``rows`` slots, float64 (rows,) or (rows, n), for x of
  shape (d,) or (d, n): one read of those rows.
* ``combine(vectors, coeffs, beta, alpha, rows)``: beta x + alpha G^T a in the compute dtype: one read.
* ``columns(index, rows)``: G[:, index] in float64.
* ``stage_batch(grads, pushed, gram, reduce)``: the rows and Gram matrix after pushing the rows of
  ``grads``, with a ``commit`` to apply them (see :class:`StagedBatch`).
* ``state_tensors()``, ``tensor_spec()``, ``settings()``, ``check_state(tensors, k)``,
  ``row_norms(tensors, k)``, ``load(tensors)``: the checkpoint schema (validated once, by
  :mod:`mfac.fisher.window_state`, for every form).

:class:`DenseRows` is the exact window in float32, float64, bfloat16 or float16;
:class:`mfac.fisher.compressed.CompressedRows` keeps a fraction of every row's entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import kernels, resources
from .base import compute_dtype

__all__ = ["DenseRows", "StagedBatch", "HALF_CHUNK_ROWS"]

HALF_CHUNK_ROWS = 64  # half-precision rows upcast to float32 at a time in window products


@dataclass
class StagedBatch:
    """The effect of pushing a batch of rows, computed before anything is written.

    ``rows``: the (k, d) rows held afterwards (only for forms that keep them dense, the primal route
    needs them; None otherwise). ``gram``: their (k, k) float64 Gram matrix. ``commit()``: write them.
    """

    gram: torch.Tensor
    rows: torch.Tensor | None
    commit: Callable[[], None]


class DenseRows:
    """The exact window: ``capacity`` rows of ``dim`` numbers in ``dtype`` (float32, float64,
    bfloat16 or float16). Products with half-precision rows accumulate in float32 (a compiled
    kernel for bfloat16 vectors, chunks of 64 upcast rows otherwise).

    Memory: capacity * dim * (bytes of ``dtype``); refused before allocating if it cannot fit. A
    half-precision window also keeps the two d-vectors of the last push it wrote (the row as stored
    and its float32 copy) and encodes the next push into them: fresh ones cost a page fault every 4
    KB, which measured 2,500 faults, a few ms, per push at d = 1M.
    """

    def __init__(self, dim: int, capacity: int, dtype: torch.dtype, device: torch.device):
        self.dim, self.capacity, self.storage_dtype, self.device = dim, capacity, dtype, device
        self.dtype = compute_dtype(dtype)
        resources.check_fits(self.nbytes_for(dim, capacity, dtype), device,
                             f"a sliding window of {capacity} gradients of {dim:,} coordinates in {dtype}",
                             "lower window, or store it in a half precision (dtype=torch.bfloat16), or compress "
                             "it (CompressedWindowFisherInverse)")
        self._grads = torch.zeros(capacity, dim, dtype=dtype, device=device)
        self._spare: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def nbytes_for(dim: int, capacity: int, dtype: torch.dtype) -> int:
        """Bytes of the rows, capacity * dim * (bytes of ``dtype``), and of the buffers kept for reuse
        (:meth:`unsaved_nbytes_for`)."""
        return capacity * dim * dtype.itemsize + DenseRows.unsaved_nbytes_for(dim, dtype)

    @staticmethod
    def unsaved_nbytes_for(dim: int, dtype: torch.dtype) -> int:
        """Bytes held but never saved in a state: for a half precision the two d-vectors of a push
        kept for reuse, dim * (bytes of ``dtype`` + 4); none otherwise."""
        return dim * (dtype.itemsize + 4) if compute_dtype(dtype) != dtype else 0

    @property
    def nbytes(self) -> int:
        held = (self._grads, *(self._spare or ()))
        return sum(t.numel() * t.element_size() for t in held)

    diag_chunk = property(lambda self: None, doc="Columns per chunk of ``diag`` (None: the window decides).")

    def encode(self, g: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """g rounded to the storage dtype (the payload, written as it is) and its copy in the compute
        dtype; for a half-precision window, into the spent buffers of the last write where there are
        any and g shares no memory with them."""
        spare, self._spare = self._spare, None
        memory = g.untyped_storage().data_ptr()
        if spare is not None and all(t.untyped_storage().data_ptr() != memory for t in spare):
            rounded, stored = spare
            rounded.copy_(g)
            return stored.copy_(rounded), (rounded, stored, True)
        rounded = g.to(self.storage_dtype)
        stored = rounded.to(self.dtype)
        # Buffers encode made itself can be reused once written (not g, nor a view of it).
        own = self.storage_dtype != self.dtype and rounded.untyped_storage().data_ptr() != memory
        return stored, (rounded, stored, own)

    def write(self, slot: int, payload: tuple) -> None:
        """Store a staged row, once; a half-precision window keeps its buffers for the next encode."""
        rounded, stored, own = payload
        self._grads[slot] = rounded
        if own:
            self._spare = (rounded, stored)

    def dots(self, vectors: torch.Tensor, rows: int) -> torch.Tensor:
        return self.dots_of(self._grads[:rows], vectors)

    def dots_of(self, grads: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """``grads`` (n, d) in the storage dtype times x (d,) or (d, n'), float64."""
        if grads.dtype == self.dtype or grads.shape[0] == 0:
            return (grads.to(self.dtype) @ vectors).to(torch.float64)
        if vectors.dim() == 1:
            return kernels.dense_dots(grads, vectors)
        return torch.cat([chunk.to(self.dtype) @ vectors for chunk in grads.split(HALF_CHUNK_ROWS)]).double()

    def combine(self, vectors: torch.Tensor, coeffs: torch.Tensor, beta: float, alpha: float,
                rows: int) -> torch.Tensor:
        grads = self._grads[:rows]
        coeffs = coeffs.to(self.dtype)
        product = torch.addmv if vectors.dim() == 1 else torch.addmm
        if grads.dtype == self.dtype:
            return product(vectors, grads.T, coeffs, beta=beta, alpha=alpha)
        if vectors.dim() == 1:
            return kernels.dense_combine(grads, coeffs, vectors, beta, alpha)
        out = vectors * beta
        for chunk, part in zip(grads.split(HALF_CHUNK_ROWS), coeffs.split(HALF_CHUNK_ROWS)):
            out = product(out, chunk.to(self.dtype).T, part, alpha=alpha)
        return out

    def columns(self, index: torch.Tensor, rows: int) -> torch.Tensor:
        return self._grads[:rows, index].to(torch.float64)

    def held(self, rows: int) -> torch.Tensor:
        """The first ``rows`` rows as stored, (rows, d) in the storage dtype (a view)."""
        return self._grads[:rows]

    def stage_batch(self, grads: torch.Tensor, pushed: int, gram: torch.Tensor, reduce) -> StagedBatch:
        """All rows of ``grads`` (n, d) at once: one GEMM for the new Gram matrix, O(k^2 d)."""
        n, capacity = grads.shape[0], self.capacity
        first = max(0, n - capacity)  # older rows would be overwritten within this batch
        slots = torch.arange(pushed + first, pushed + n, device=self.device) % capacity
        k = min(pushed + n, capacity)
        rows = self._grads[:k].clone()
        rows[slots] = grads[first:].to(self.storage_dtype)
        new_gram = self.dots_of(rows, rows.to(self.dtype).T)
        new_gram = reduce(new_gram)
        new_gram = (new_gram + new_gram.T) / 2  # a GEMM need not round A A^T symmetrically; the factor assumes it

        def commit() -> None:
            self._grads[:k] = rows
        return StagedBatch(new_gram, rows, commit)

    # Checkpoint schema ----------------------------------------------------------------------------

    def settings(self) -> dict:
        return {}

    def tensor_spec(self) -> dict:
        return {"grads": ((self.capacity, self.dim), self.storage_dtype)}

    def state_tensors(self) -> dict:
        return {"grads": self._grads.clone()}

    def check_state(self, tensors: dict, k: int) -> None:
        if bool(tensors["grads"][k:].any()):
            raise ValueError(f"window state holds rows beyond the {k} gradients that its pushed count implies")

    def row_norms(self, tensors: dict, k: int) -> torch.Tensor:
        return tensors["grads"][:k].to(torch.float64).square().sum(1)

    def load(self, tensors: dict) -> None:
        self._grads.copy_(tensors["grads"])
