"""The compressed sliding window: M-FAC over sparsified gradients with error feedback (EFCP).

Modoranu et al. (2023), "Error Feedback Can Accurately Compress Preconditioners": a window of m
gradients of d coordinates is the optimizer's whole state (93 GB for m = 1024 on MiniLM-L6 in
float32). Keeping only the largest 1% of each gradient's entries makes it 100x smaller, and
error feedback makes the loss harmless: what a gradient leaves out is kept in a residual and
added to the next one, so every coordinate's mass enters the window eventually.

For each gradient g pushed:

    a <- g + residual
    c <- the largest density * block entries of |a| in every block of ``block`` coordinates
    residual <- a - c          (c as stored: values rounded to the storage dtype, if bfloat16)
    window <- c                (replaces the oldest row)

and ``push_ihvp`` returns F^-1 c, with F = damp*I + C^T C / k over the compressed rows C held,
as the EFCP optimizer does (it preconditions the compressed gradient). ``ihvp(x)`` is the exact
F^-1 x over those rows for any x: the Woodbury algebra, the float64 Gram matrix and its Cholesky
factor are those of :class:`SlidingWindowFisherInverse`; only the storage and the two window
products differ.

Storage: every row holds the same number of entries in each block (a top-k per block, not over
the whole vector), as (value, int16 offset within the block) pairs, so a row costs
nnz * (2 + 4) bytes in float32 or nnz * (2 + 2) in bfloat16, nnz = sum over blocks of
ceil(density * block size). The entries are stored block-major (:class:`mfac.kernels.BlockLayout`):
a product (:mod:`mfac.kernels`) reads each block's entries of all rows as one contiguous run while
that block of x, or of the result, stays in cache. Row-major storage measured 1.7x slower.
"""

from __future__ import annotations

import math

import torch

from .. import kernels, resources
from .base import NonFiniteGradientError, all_finite
from .window import SlidingWindowFisherInverse, _check_positive_int

__all__ = ["CompressedWindowFisherInverse", "compressed_nbytes"]

MAX_BLOCK = 32768  # offsets within a block must fit an int16
DEFAULT_BLOCK = 8192  # measured fastest of 4096..32768 at d = 22.7M, m = 1024, density 1% (BENCHMARKS.md)


def check_density(density) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < float(density) <= 1:
        raise ValueError(f"density must be a number in (0, 1] (the fraction of each gradient's entries kept, "
                         f"e.g. 0.01), got {density!r}")
    return float(density)


def compressed_nbytes(dim: int, window: int, density: float, dtype: torch.dtype = torch.float32,
                      block: int = DEFAULT_BLOCK) -> int:
    """Bytes a CompressedWindowFisherInverse holds at its peak: values and offsets of every row,
    the residual and two dense staging vectors (float32), three index tables, 5 m x m float64."""
    full, last = divmod(dim, block)
    nnz = full * max(1, math.ceil(density * block)) + (max(1, math.ceil(density * last)) if last else 0)
    value_bytes = torch.empty(0, dtype=dtype).element_size()
    return window * nnz * (value_bytes + 2) + 3 * dim * 4 + 3 * nnz * 8 + 5 * window * window * 8


class CompressedWindowFisherInverse(SlidingWindowFisherInverse):
    """F^-1 over the last ``window`` gradients, each compressed to ``density`` of its entries with
    error feedback (EFCP); the same protocol as :class:`SlidingWindowFisherInverse`.

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
        dim = _check_positive_int("dim", dim)
        window = _check_positive_int("window", window)
        self._density = check_density(density)
        block = _check_positive_int("block", block)
        if block > MAX_BLOCK:
            raise ValueError(f"block must be at most {MAX_BLOCK} (offsets within a block are int16), got {block}")
        if dim <= window:
            raise ValueError(f"a compressed window needs dim > window, got dim = {dim} and window = {window}; for a "
                             f"model this small the dense SlidingWindowFisherInverse costs no more: use it")
        if dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"dtype must be torch.float32 or torch.bfloat16 for a compressed window, got {dtype!r}")
        self._block = min(block, dim)
        super().__init__(dim, window, damp, dtype=dtype, device=device)

    def _allocate(self) -> None:
        resources.check_fits(compressed_nbytes(self._dim, self._window, self._density, self._storage_dtype,
                                               self._block), self._device,
                             f"a compressed window of {self._window} gradients of {self._dim:,} coordinates at "
                             f"density {self._density:g} in {self._storage_dtype}", "lower window or density")
        self._layout = kernels.BlockLayout.build(self._dim, self._density, self._block, self._window, self._device)
        self._starts = self._layout.starts
        size = self._window * self._layout.nnz
        self._values = torch.zeros(size, dtype=self._storage_dtype, device=self._device)
        self._offsets = torch.zeros(size, dtype=torch.int16, device=self._device)
        self._residual = torch.zeros(self._dim, dtype=torch.float32, device=self._device)

    density = property(lambda self: self._density, doc="Fraction of each gradient's entries kept.")
    block = property(lambda self: self._block, doc="Coordinates per block of the per-block top-k.")
    nnz = property(lambda self: self._layout.nnz, doc="Entries kept of every gradient.")
    route = property(lambda self: "dual", doc="Always 'dual' (a k x k factor): d > window.")
    residual = property(lambda self: self._residual.clone(), doc="The error-feedback vector (d,), float32.")

    def _state_tensors(self) -> tuple:
        layout = self._layout
        return (self._values, self._offsets, self._residual, layout.starts, layout.bases, layout.first, layout.kept,
                self._gram, self._lower)

    def _runs(self, flat: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Views of a block-major (window * nnz,) tensor as (blocks, window, kept) runs: one for
        the blocks of ``block`` coordinates, one for a shorter last block; with each run's first
        block index."""
        starts, blocks = self._starts, self._starts.numel() - 1
        full = self.dim // self._block
        runs, done = [], 0
        for first, count in ((0, full), (full, blocks - full)):
            if count:
                kept = int(starts[first + 1] - starts[first])
                size = count * self.window * kept
                runs.append((first, flat[done: done + size].view(count, self.window, kept)))
                done += size
        return runs

    # Storage: compression and the two products ---------------------------------------------------------

    def _compress(self, accumulated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top entries of every block of ``accumulated`` (d,) float32: returns (values in the storage
        dtype, int16 offsets, the dense (d,) float32 vector of the values as stored)."""
        full = (self._dim // self._block) * self._block
        offsets, values = [], []
        starts = self._starts.tolist()
        if full:
            blocks = accumulated[:full].view(-1, self._block)
            kept = starts[1] - starts[0]
            index = blocks.abs().topk(kept, dim=1, sorted=False).indices
            values.append(blocks.gather(1, index).reshape(-1))
            offsets.append(index.reshape(-1))
        if full < self._dim:
            tail = accumulated[full:]
            index = tail.abs().topk(starts[-1] - starts[-2], sorted=False).indices
            values.append(tail[index])
            offsets.append(index)
        values = torch.cat(values).to(self._storage_dtype)
        offsets = torch.cat(offsets)
        stored = torch.zeros(self._dim, dtype=torch.float32, device=self._device)
        stored[offsets + self._layout.bases] = values.float()
        return values, offsets.to(torch.int16), stored

    def _encode(self, g: torch.Tensor) -> tuple[torch.Tensor, object]:
        # A NaN would be kept by top-k or hidden in the residual: refuse non-finite input first.
        if not all_finite(g):
            raise NonFiniteGradientError("g contains NaN or Inf; non-finite gradients cannot enter the window, "
                                         "which was left unchanged")
        accumulated = self._residual + g.to(torch.float32)
        if not all_finite(accumulated):
            raise NonFiniteGradientError("g plus the error-feedback residual overflows float32; scale the loss down "
                                         "or clip gradients; the window was left unchanged")
        values, offsets, stored = self._compress(accumulated)
        return stored, (values, offsets, accumulated.sub_(stored))

    def _store(self, slot: int, payload) -> None:
        values, offsets, residual = payload
        positions = self._layout.positions(torch.tensor([slot], device=self.device))[0]
        self._values[positions] = values
        self._offsets[positions] = offsets
        self._residual = residual

    def _window_dots(self, vectors: torch.Tensor, rows: int | None = None, replace: tuple | None = None,
                     grads=None) -> torch.Tensor:
        rows = self.num_grads if rows is None else rows
        columns = vectors if vectors.dim() == 2 else vectors[:, None]
        out = torch.stack([kernels.sparse_dots(self._layout, self._values, self._offsets, rows,
                                               column.to(torch.float32).contiguous())
                           for column in columns.unbind(1)], 1)
        return self._finish_dots(out if vectors.dim() == 2 else out[:, 0], vectors, replace)

    def _window_combine(self, vectors: torch.Tensor, coeffs: torch.Tensor, beta: float, alpha: float,
                        rows: int | None = None) -> torch.Tensor:
        rows = self.num_grads if rows is None else rows
        if vectors.dim() == 1:
            return kernels.sparse_combine(self._layout, self._values, self._offsets, rows, coeffs,
                                          vectors.to(torch.float32).contiguous(), beta, alpha)
        return torch.stack([kernels.sparse_combine(self._layout, self._values, self._offsets, rows, part,
                                                   column.to(torch.float32).contiguous(), beta, alpha)
                            for column, part in zip(vectors.unbind(1), coeffs.unbind(1))], 1)

    def _decode_block(self, block: int) -> torch.Tensor:
        """Block ``block`` of the rows held, dense: (num_grads, block size) float32."""
        size = min(self._block, self.dim - block * self._block)
        k = self.num_grads
        values, offsets = self._run_of(self._values, block)[:k], self._run_of(self._offsets, block)[:k]
        out = torch.zeros(k, size, dtype=torch.float32, device=self.device)
        out.scatter_(1, offsets.long(), values.float())
        return out

    def _run_of(self, flat: torch.Tensor, block: int) -> torch.Tensor:
        """Block ``block``'s entries of every slot, (window, kept), a view of ``flat``."""
        for first, run in reversed(self._runs(flat)):
            if block >= first:
                return run[block - first]
        raise IndexError(block)

    def _columns(self, index: torch.Tensor) -> torch.Tensor:
        """G[:, index] over the rows held, float64; decodes each block touched (num_grads * block
        float32 numbers at a time)."""
        out = torch.empty(self.num_grads, index.numel(), dtype=torch.float64, device=self.device)
        blocks = torch.div(index, self._block, rounding_mode="floor")
        for block in torch.unique(blocks).tolist():
            picked = (blocks == block).nonzero()[:, 0]
            out[:, picked] = self._decode_block(block)[:, index[picked] - block * self._block].double()
        return out

    def _diag_step(self) -> int:
        return self._block

    # Batches and checkpoints ---------------------------------------------------------------------

    def extend(self, grads: torch.Tensor) -> None:
        """Push the rows of ``grads`` (n, d) in order, as n calls to ``push`` would (each row passes
        through error feedback), with one factorisation at the end: O(n k nnz + k^3). A non-finite
        row rejects the whole batch and leaves the window unchanged."""
        self._check_batch(grads)
        if grads.shape[0] == 0:
            return
        saved = (self._values.clone(), self._offsets.clone(), self._residual.clone(), self._gram.clone(),
                 self._lower, self._pushed)
        try:
            for row in grads:  # error feedback chains the rows; only the factor is deferred
                stored, payload = self._encode(row)
                slot, k = self._pushed % self.window, min(self._pushed + 1, self.window)
                dots = self._window_dots(stored, rows=k, replace=(slot, stored))
                if not all_finite(dots):
                    raise NonFiniteGradientError(f"grads are finite but their dot products overflow {self.dtype}; "
                                                 f"scale them down; the window was left unchanged")
                self._store(slot, payload)
                self._gram[slot, :k] = dots
                self._gram[:k, slot] = dots
                self._pushed += 1
            k = self.num_grads
            self._lower = self._factor(self._gram[:k, :k], None)
        except BaseException:
            self._values, self._offsets, self._residual, self._gram, self._lower, self._pushed = saved
            raise

    def state_dict(self) -> dict:
        """Window entries (values, int16 offsets), the residual, the float64 Gram matrix and the
        count of pushes: plain tensors and numbers, loadable with ``weights_only=True``."""
        return {"dim": self.dim, "window": self.window, "damp": self._damp, "storage_dtype": str(self.storage_dtype),
                "density": self._density, "block": self._block, "pushed": self._pushed,
                "values": self._values.clone(), "offsets": self._offsets.clone(), "residual": self._residual.clone(),
                "gram": self._gram.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from ``state_dict``; later results are bitwise those of the saved object.
        Everything is checked first (keys, sizes, dtypes, finiteness, every offset inside its block,
        the Gram matrix against the rows); a failed load raises ValueError and changes nothing."""
        if not isinstance(state, dict):
            raise ValueError(f"window state must be a dict from state_dict(), got {type(state).__name__}")
        required = {"dim", "window", "damp", "storage_dtype", "density", "block", "pushed", "values", "offsets",
                    "residual", "gram"}
        if set(state) != required:
            raise ValueError(f"compressed window state must have exactly the keys {sorted(required)}; missing "
                             f"{sorted(required - set(state))}, unknown {sorted(set(state) - required)}")
        for key, mine in (("dim", self.dim), ("window", self.window), ("block", self._block), ("damp", self._damp),
                          ("density", self._density), ("storage_dtype", str(self.storage_dtype))):
            if type(state[key]) is not type(mine) or state[key] != mine:
                raise ValueError(f"window state has {key} = {state[key]!r} but this window has {key} = {mine!r}; "
                                 f"construct it with the same {key}")
        pushed = state["pushed"]
        if isinstance(pushed, bool) or not isinstance(pushed, int) or pushed < 0:
            raise ValueError(f"window state has pushed = {pushed!r}; it must be an int >= 0")
        for key, mine in (("values", self._values), ("offsets", self._offsets), ("residual", self._residual),
                          ("gram", self._gram)):
            tensor = state[key]
            if not isinstance(tensor, torch.Tensor) or tensor.shape != mine.shape or tensor.dtype != mine.dtype:
                got = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor)
                raise ValueError(f"window state's {key} must be a {tuple(mine.shape)} {mine.dtype} tensor, got {got}")
            if tensor.is_floating_point() and not all_finite(tensor):
                raise ValueError(f"window state's {key} contains NaN or Inf")
        values, offsets, gram = state["values"].to(self.device), state["offsets"].to(self.device), state["gram"]
        # Offsets index memory in the kernels: one outside its block would read or write out of bounds.
        for (first, run) in self._runs(offsets):
            size = min(self._block, self.dim - first * self._block)  # a shorter last block has a run of its own
            if bool((run < 0).any()) or bool((run >= size).any()):
                raise ValueError("window state's offsets fall outside their blocks; the file is corrupt or was not "
                                 "written by state_dict()")
        k = min(pushed, self.window)
        if not torch.equal(gram, gram.T):
            raise ValueError("window state's gram is not symmetric; it does not come from state_dict()")
        beyond = [bool(run[:, k:].any()) for flat in (values, offsets) for _, run in self._runs(flat)]
        if any(beyond) or bool(gram[k:].any()):
            raise ValueError(f"window state holds data beyond the {k} gradients that pushed = {pushed} implies")
        norms = sum(run[:, :k].double().square().sum((0, 2)) for _, run in self._runs(values))
        if not torch.allclose(gram.diagonal()[:k].to(norms.device), norms, rtol=1e-3, atol=1e-30):
            raise ValueError("window state's gram does not match its values (the diagonal must hold the rows' "
                             "squared norms); the tensors come from different states")
        lower = self._factor(gram[:k, :k].to(self.device), None)
        self._values.copy_(values)
        self._offsets.copy_(offsets)
        self._residual.copy_(state["residual"])
        self._gram.copy_(gram)
        self._lower = lower
        self._pushed = pushed
