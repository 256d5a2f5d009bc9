"""The sliding-window Fisher inverse: the dynamic M-FAC algorithm behind the optimizer.

A ring buffer holds the last ``window`` gradients G (k, d), k = min(pushed, window), and the
object answers F^-1 x for F = damp*I + G^T G / k through the Woodbury identity

    F^-1 x = (x - G^T K^-1 G x) / damp,        K = k*damp*I + G G^T   (k x k).

It keeps the float64 Gram matrix S = G G^T, whatever the window's storage dtype (each entry is one
dot product, so S is exact up to the rounding of that product), and the Cholesky factor L of K,
refactorised from S after every push (O(k^3 / 3); 17 ms at k = 1024 on two CPU cores, a few
percent of the two window passes once d reaches about 1M). Every product with K^-1 is a pair of
triangular solves with L. This is what makes the window backward stable, like the static inverse:
an explicit K^-1, updated by low-rank corrections, is accurate only to eps * cond(K), and the
Woodbury subtraction then multiplies that error by cond(F) again, which for nearly collinear
gradients (late in training) gave errors of 10^2 to 10^9 times eps * cond(F).

For the gradient just pushed, g = G^T e_j, the product needs no subtraction at all:

    F^-1 g = k * G^T K^-1 e_j,

so ``push_ihvp`` reads the window exactly twice (G g for the new row of S, then G^T a) and adds
no cancellation. A push is staged first (nothing changes), then committed only when the gradient,
its dot products and the result are finite: a refused push leaves the window bitwise unchanged.
All products G x go through ``_window_dots``, the single place where a sharded window would
all-reduce an m-vector.

When d <= window (``route == "primal"``) the k x k matrix K is rank-deficient beyond d and far worse
conditioned than F, so the window factors the d x d matrix k*damp*I + G^T G instead, recomputed
exactly from the rows (O(k d^2) <= O(k^3)); then F^-1 x = k (k*damp*I + G^T G)^-1 x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import kernels, resources
from .base import (FisherInverse, NonFiniteGradientError, all_finite, check_damp, check_finite, check_floating,
                   compute_dtype, robust_cholesky)

__all__ = ["SlidingWindowFisherInverse"]

_HALF_CHUNK_ROWS = 64  # half-precision rows upcast to float32 at a time in window products
_LEGACY_KEYS = {"inverse", "since_refactor", "refactor_every"}  # written by mfac 0.1.0; no longer needed


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


@dataclass
class _StagedPush:
    """A push computed but not yet applied: everything ``_commit`` needs, and the result."""

    slot: int
    stored: torch.Tensor  # g as the window will hold it (rounded, or compressed), dense, in the compute dtype
    payload: object  # what ``_store`` writes into the window for it
    dots: torch.Tensor  # (k,) float64: the new row and column of S
    lower: torch.Tensor  # (k, k) float64 Cholesky factor of k*damp*I + S_new
    direction: torch.Tensor | None = None  # F^-1 g with g in the window, when asked for


class SlidingWindowFisherInverse(FisherInverse):
    """F^-1 over the last ``window`` gradients pushed, updated in O(d*window + window^3) per push.

    Args:
        dim: d, the length of every gradient.
        window: m, how many of the most recent gradients are kept.
        damp: lambda > 0 (at least the smallest normal number of the compute dtype, so that
            1 / damp is finite there).
        dtype: storage dtype of the window: float32, float64, bfloat16 or float16. Products with
            half-precision windows accumulate in float32, and results come back in float32
            (``dtype`` reports the result dtype, ``storage_dtype`` the window's).
        device: where the window lives (default: the current default device).
        reduce: for a window sharded by coordinates (each process holds ``dim`` of the columns of
            every row): a callable that sums a float64 tensor over the shards, in place, and returns
            it. Every dot product the window takes (an m-vector per push, the m x m Gram matrix in
            ``extend`` and on load) goes through it, so all shards hold the same float64 state and
            each computes its own slice of F^-1 x. ``mfac.distributed`` makes one from a process
            group. Default None: the window is whole.

    Memory: window*d numbers in ``dtype`` plus 2*window^2 float64 numbers (S and its factor), up to
    5*window^2 while a push is staged (copies of S, the shifted matrix, the new factor). The
    constructor refuses, before allocating, a window that does not fit in the memory available on
    ``device``.
    Until ``window`` gradients have arrived, F is normalised by the number held, never by ``window``.
    Accuracy: backward stable, relative error within a small multiple of eps * cond(F) for every
    input (eps of the compute dtype), as the static inverse.
    """

    def __init__(self, dim: int, window: int, damp: float, dtype: torch.dtype = torch.float32, device=None,
                 reduce=None):
        dim = _check_positive_int("dim", dim)
        window = _check_positive_int("window", window)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
        check_floating("dtype", dtype)
        self._damp = check_damp(damp, compute_dtype(dtype))
        if reduce is not None and not callable(reduce):
            raise TypeError(f"reduce must be callable or None, got {type(reduce).__name__}")
        self._dim, self._window, self._storage_dtype = dim, window, dtype
        self._device = torch.device(device) if device is not None else torch.empty(0).device
        self._reduce = reduce
        self._allocate()
        self._gram = torch.zeros(window, window, dtype=torch.float64, device=self._device)
        self._lower = torch.zeros(0, 0, dtype=torch.float64, device=self._device)
        self._pushed = 0

    def _allocate(self) -> None:
        """Check that the rows fit, then allocate them (the storage form's own constructor)."""
        resources.check_fits(window_nbytes(self._dim, self._window, self._storage_dtype), self._device,
                             f"a sliding window of {self._window} gradients of {self._dim:,} coordinates in "
                             f"{self._storage_dtype}", "lower window, or store it in a half precision "
                             "(dtype=torch.bfloat16), or compress it (CompressedWindowFisherInverse)")
        self._grads = torch.zeros(self._window, self._dim, dtype=self._storage_dtype, device=self._device)

    dim = property(lambda self: self._dim)
    window = property(lambda self: self._window, doc="m, the capacity of the window.")
    num_grads = property(lambda self: min(self._pushed, self.window))
    pushed = property(lambda self: self._pushed, doc="How many gradients have been pushed in total.")
    damp = property(lambda self: self._damp)
    device = property(lambda self: self._device)
    storage_dtype = property(lambda self: self._storage_dtype)
    dtype = property(lambda self: compute_dtype(self._storage_dtype))
    route = property(lambda self: "primal" if self.dim <= self.window and self._reduce is None else "dual",
                     doc="'dual' (k x k factor, d > window, or sharded) or 'primal' (d x d factor, d <= window).")
    nbytes = property(lambda self: sum(t.numel() * t.element_size() for t in self._state_tensors()))

    def _state_tensors(self) -> tuple:
        return self._grads, self._gram, self._lower

    # Window products: the only passes over G ------------------------------------------------------

    def _window_dots(self, vectors: torch.Tensor, rows: int | None = None, replace: tuple | None = None,
                     grads: torch.Tensor | None = None) -> torch.Tensor:
        """G x for x of shape (d,) or (d, n) over the first ``rows`` slots (default: those held):
        returns (rows,) or (rows, n) in float64. ``replace=(slot, g)`` takes g as row ``slot``;
        ``grads`` replaces the stored rows altogether.

        This is the single reduction point: with the window's columns sharded across processes,
        each computes its partial product here and ``reduce`` sums the small result.
        """
        grads = self._grads[: self.num_grads if rows is None else rows] if grads is None else grads
        if grads.dtype == self.dtype or grads.shape[0] == 0:
            out = (grads.to(self.dtype) @ vectors).to(torch.float64)
        elif vectors.dim() == 1:
            out = kernels.dense_dots(grads, vectors)
        else:
            out = torch.cat([chunk.to(self.dtype) @ vectors for chunk in grads.split(_HALF_CHUNK_ROWS)])
            out = out.to(torch.float64)
        return self._finish_dots(out, vectors, replace)

    def _finish_dots(self, out: torch.Tensor, vectors: torch.Tensor, replace: tuple | None) -> torch.Tensor:
        """Put the replaced row's dot products into ``out`` (float64), then sum over the shards."""
        if replace is not None:
            slot, row = replace
            out[slot] = (row.to(self.dtype) @ vectors).to(torch.float64)
        return out if self._reduce is None else self._reduce(out)

    def _all_finite(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is finite on every shard (so all shards take the same decision)."""
        if self._reduce is None:
            return all_finite(tensor)
        flag = torch.zeros(1, dtype=torch.float64, device=self.device)
        flag[0] = 0.0 if all_finite(tensor) else 1.0
        return float(self._reduce(flag)[0]) == 0.0

    def _window_combine(self, vectors: torch.Tensor, coeffs: torch.Tensor, beta: float, alpha: float,
                        rows: int | None = None) -> torch.Tensor:
        """beta * x + alpha * G^T a for x of shape (d,) or (d, n) and a of shape (k,) or (k, n)."""
        grads = self._grads[: self.num_grads if rows is None else rows]
        coeffs = coeffs.to(self.dtype)
        product = torch.addmv if vectors.dim() == 1 else torch.addmm
        if grads.dtype == self.dtype:
            return product(vectors, grads.T, coeffs, beta=beta, alpha=alpha)
        if vectors.dim() == 1:
            return kernels.dense_combine(grads, coeffs, vectors, beta, alpha)
        out = vectors * beta
        for chunk, part in zip(grads.split(_HALF_CHUNK_ROWS), coeffs.split(_HALF_CHUNK_ROWS)):
            out = product(out, chunk.to(self.dtype).T, part, alpha=alpha)
        return out

    # The small state ----------------------------------------------------------------------------

    def _factor(self, gram: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The Cholesky factor the route uses, for the k rows held and their (k, k) float64 Gram
        matrix: of k*damp*I + gram (dual, O(k^3 / 3)), or of k*damp*I + rows^T rows computed in
        float64 (primal, O(k d^2 + d^3 / 3))."""
        k = gram.shape[0]
        if self.route == "primal":
            if k == 0:
                return torch.zeros(0, 0, dtype=torch.float64, device=self.device)
            rows = rows.to(torch.float64)
            shifted = rows.T @ rows
            shifted = (shifted + shifted.T) / 2
        else:
            shifted = gram.clone()
        shifted.diagonal().add_(k * self._damp)
        return robust_cholesky(shifted, k * self._damp)

    def _solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """K^-1 rhs for rhs of shape (k,) or (k, n) in float64, by two triangular solves."""
        columns = rhs if rhs.dim() == 2 else rhs[:, None]
        out = torch.cholesky_solve(columns, self._lower)
        return out if rhs.dim() == 2 else out[:, 0]

    # Pushing: stage (no change), then commit ------------------------------------------------------

    def _stage(self, g, want_direction: bool) -> _StagedPush:
        """Compute everything a push of g changes, and optionally F^-1 g with g in the window,
        without changing the window. Raises NonFiniteGradientError for a g that cannot enter."""
        stored, payload = self._encode(self._check_gradient(g))
        slot = self._pushed % self.window
        k = min(self._pushed + 1, self.window)
        dots = self._window_dots(stored, rows=k, replace=(slot, stored))  # row `slot` becomes g
        # NaN or Inf in g makes its dot products non-finite, so the window pass doubles as the check;
        # only then is g scanned, to tell a non-finite gradient from one too large for the dtype.
        if not all_finite(dots):
            if not all_finite(stored):
                raise NonFiniteGradientError("g contains NaN or Inf; non-finite gradients cannot enter the window, "
                                             "which was left unchanged")
            norm = float(torch.linalg.vector_norm(stored.to(torch.float64)))
            raise NonFiniteGradientError(
                f"g is finite but too large for {self.dtype} products: its norm {norm:.3g} (or its dot product "
                f"with a gradient in the window) overflows {self.dtype}, whose largest value is "
                f"{torch.finfo(self.dtype).max:.3g}. Scale the loss down, clip gradients, or use a float64 window; "
                f"the window was left unchanged")
        gram = self._gram[:k, :k].clone()
        gram[slot, :] = dots
        gram[:, slot] = dots
        rows = None
        if self.route == "primal":  # at most window x window numbers
            rows = self._grads[:k].clone()
            rows[slot] = stored.to(self.storage_dtype)
        staged = _StagedPush(slot, stored, payload, dots, self._factor(gram, rows))
        if want_direction and self.route == "primal":
            staged.direction = self._primal_apply(stored, staged.lower, k)
        elif want_direction:
            # F^-1 g = k G_new^T K_new^-1 e_j. G_new differs from the stored rows in row j only, so
            # G_new^T a = (G_old^T a with a_j = 0) + a_j g: the window is read once and not yet written.
            unit = torch.zeros(k, dtype=torch.float64, device=self.device)
            unit[slot] = 1.0
            coeffs = torch.cholesky_solve(unit[:, None], staged.lower)[:, 0]
            weight = float(coeffs[slot]) * k
            coeffs[slot] = 0.0
            direction = self._window_combine(stored, coeffs, weight, float(k), rows=k)
            staged.direction = direction
        if want_direction and not self._all_finite(staged.direction):
            largest = float(torch.linalg.vector_norm(stored, ord=math.inf))
            raise NonFiniteGradientError(
                f"F^-1 g overflows {self.dtype} (damp = {self._damp:g} is too small for gradients of size "
                f"{largest:.3g}); the window was left unchanged")
        return staged

    def _staged_ihvp(self, staged: _StagedPush, x: torch.Tensor) -> torch.Tensor:
        """F^-1 x for x (d,) as it will be once ``staged`` is committed, without changing anything:
        the staged row stands in for the one it replaces. Two reads of the window. Raises
        NonFiniteGradientError if the result is not finite."""
        k = staged.dots.shape[0]
        if self.route == "primal":
            out = self._primal_apply(x, staged.lower, k)
        else:
            coeffs = torch.cholesky_solve(self._window_dots(x, rows=k, replace=(staged.slot, staged.stored))[:, None],
                                          staged.lower)[:, 0]
            weight = float(coeffs[staged.slot])
            coeffs[staged.slot] = 0.0  # the old row in that slot: its part is the staged row's, added below
            out = self._window_combine(x, coeffs, 1.0 / self._damp, -1.0 / self._damp, rows=k)
            out.add_(staged.stored, alpha=-weight / self._damp)
        if not self._all_finite(out):
            raise NonFiniteGradientError(f"F^-1 x overflows {self.dtype} (damp = {self._damp:g} is too small for "
                                         f"this x); the window was left unchanged")
        return out

    def _primal_apply(self, x: torch.Tensor, lower: torch.Tensor, k: int) -> torch.Tensor:
        """Primal route: F^-1 x = k (k*damp*I + G^T G)^-1 x for x of shape (d,) or (d, n)."""
        if k == 0:
            return (x / self._damp).to(self.dtype)
        columns = x.to(torch.float64)
        columns = columns if columns.dim() == 2 else columns[:, None]
        out = torch.cholesky_solve(columns, lower) * k
        return (out if x.dim() == 2 else out[:, 0]).to(self.dtype)

    def _encode(self, g: torch.Tensor) -> tuple[torch.Tensor, object]:
        """g as the window will hold it, dense in the compute dtype, and what ``_store`` writes."""
        stored = g.to(self.storage_dtype).to(self.dtype)
        return stored, stored

    def _store(self, slot: int, payload) -> None:
        self._grads[slot] = payload

    def _commit(self, staged: _StagedPush) -> None:
        k = staged.dots.shape[0]
        self._store(staged.slot, staged.payload)
        self._gram[staged.slot, :k] = staged.dots
        self._gram[:k, staged.slot] = staged.dots
        self._lower = staged.lower
        self._pushed += 1

    def _check_batch(self, grads) -> None:
        """Refuse, before anything changes, a batch for ``extend`` that is not (n, d), floating,
        on the window's device and finite."""
        if not isinstance(grads, torch.Tensor) or grads.dim() != 2 or grads.shape[1] != self.dim:
            shape = tuple(grads.shape) if isinstance(grads, torch.Tensor) else type(grads).__name__
            raise ValueError(f"grads must be a tensor of shape (n, {self.dim}), got {shape}")
        check_floating("grads", grads.dtype)
        if grads.device != self.device:
            raise ValueError(f"grads is on {grads.device} but the window lives on {self.device}")
        check_finite("grads", grads)

    def _check_gradient(self, g) -> torch.Tensor:
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"g must be a torch.Tensor of shape ({self.dim},), got {type(g).__name__}")
        if g.shape != (self.dim,):
            raise ValueError(f"g must have shape ({self.dim},) to match the window's dim, got {tuple(g.shape)}")
        check_floating("g", g.dtype)
        if g.device != self.device:
            raise ValueError(f"g is on {g.device} but the window lives on {self.device}; move it with .to('{self.device}')")
        return g

    # Public API ----------------------------------------------------------------------------------

    def push(self, g: torch.Tensor) -> None:
        """Replace the oldest gradient by g, shape (d,). A g that is not finite, or whose dot products
        overflow the compute dtype, raises NonFiniteGradientError (a ValueError) and leaves the
        window unchanged. Cost: one pass over the window plus O(window^3 / 3)."""
        self._commit(self._stage(g, want_direction=False))

    def push_ihvp(self, g: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Push g, then return F^-1 g with g already in the window, shape (d,), in ``dtype``; or,
        with ``x`` (shape (d,)), F^-1 x with g in the window.

        The window's copy of g is what both the update and the product use, so with a half-precision
        window this is F^-1 of g rounded to that precision (and with a compressed window, of the
        compressed g). If g or the result is not finite, NonFiniteGradientError is raised and the
        window is unchanged. Cost: two passes over the window (G g, then G^T a) plus
        O(window^3 / 3); one more with ``x``.
        """
        if x is not None:
            x = self._check_vectors(x)
            if x.dim() != 1:
                raise ValueError(f"x must have shape ({self.dim},), got {tuple(x.shape)}")
        staged = self._stage(g, want_direction=x is None)
        direction = staged.direction if x is None else self._staged_ihvp(staged, x.to(self.dtype))
        self._commit(staged)
        return direction

    def extend(self, grads: torch.Tensor) -> None:
        """Push the rows of ``grads`` (n, d) in order, as n calls to ``push`` would, but with one
        Gram matrix and one factorisation: O(k^2 d + k^3) with k = min(n + held, window). Use it to
        warm-start a window from a batch. A non-finite row rejects the whole batch and leaves the
        window unchanged; an empty batch changes nothing."""
        self._check_batch(grads)
        n = grads.shape[0]
        if n == 0:
            return
        first = max(0, n - self.window)  # older rows would be overwritten within this call
        slots = torch.arange(self._pushed + first, self._pushed + n, device=self.device) % self.window
        k = min(self._pushed + n, self.window)
        rows = self._grads[:k].clone()
        rows[slots] = grads[first:].to(self.storage_dtype)
        computed = rows.to(self.dtype)
        gram = self._window_dots(computed.T, grads=rows)
        gram = (gram + gram.T) / 2  # a GEMM need not round A A^T symmetrically; the factor assumes it
        if not all_finite(gram):
            raise NonFiniteGradientError(f"grads are finite but their dot products overflow {self.dtype}; scale them "
                                         f"down or use a float64 window; the window was left unchanged")
        lower = self._factor(gram, rows)
        self._grads[:k] = rows
        self._gram[:k, :k] = gram
        self._lower = lower
        self._pushed += n

    def ihvp(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_vectors(x)
        vectors = x.mT if x.dim() == 2 else x  # (d,) or (d, n)
        if self.route == "primal":
            out = self._primal_apply(vectors, self._lower, self.num_grads)
            return out.mT.contiguous() if x.dim() == 2 else out
        coeffs = self._solve(self._window_dots(vectors))
        out = self._window_combine(vectors, coeffs, 1.0 / self._damp, -1.0 / self._damp)
        return out.mT.contiguous() if x.dim() == 2 else out

    def _columns(self, index: torch.Tensor) -> torch.Tensor:
        """G[:, index] over the rows held, float64, shape (num_grads, len(index))."""
        return self._grads[: self.num_grads, index].to(torch.float64)

    def _whitened_columns(self, index: torch.Tensor) -> torch.Tensor:
        """Dual route: L^-1 G[:, index]; primal route: L^-1 e_index. float64, (rows of L, len(index))."""
        if self.route == "primal":
            columns = torch.zeros(self.dim, index.numel(), dtype=torch.float64, device=self.device)
            columns[index, torch.arange(index.numel(), device=self.device)] = 1.0
        else:
            columns = self._columns(index)
        return torch.linalg.solve_triangular(self._lower, columns, upper=False)

    def _primal_entries(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Primal route: [F^-1]_ij = k (L^-1 e_i) . (L^-1 e_j) for index vectors i, j (float64)."""
        k = self.num_grads
        if k == 0:
            return (i == j).to(torch.float64) / self._damp
        return k * (self._whitened_columns(i) * self._whitened_columns(j)).sum(0)

    def diag(self) -> torch.Tensor:
        """diag(F^-1) = (1 - ||L^-1 G[:, q]||^2) / damp, shape (d,). Cost O(d window^2)."""
        if self.route == "primal":
            index = torch.arange(self.dim, device=self.device)
            return self._primal_entries(index, index).to(self.dtype)
        out = torch.empty(self.dim, dtype=self.dtype, device=self.device)
        step = self._diag_step()
        for c0 in range(0, self.dim, step):
            index = torch.arange(c0, min(c0 + step, self.dim), device=self.device)
            out[c0: c0 + step] = (1.0 - self._whitened_columns(index).square().sum(0)) / self._damp
        return out

    def _diag_step(self) -> int:
        """Columns whitened at a time by ``diag`` (about 32 MB of float64)."""
        return max(1, (1 << 22) // max(self.num_grads, 1))

    def element(self, i, j) -> torch.Tensor:
        """[F^-1]_ij = (delta_ij - (L^-1 G[:, i]) . (L^-1 G[:, j])) / damp. Cost O(window^2) per pair."""
        i, j = self._check_pair(i, j)
        if self.route == "primal":
            return self._primal_entries(i.reshape(-1), j.reshape(-1)).to(self.dtype).reshape(i.shape)
        delta = (i == j).to(torch.float64).reshape(-1)
        vi, vj = self._whitened_columns(i.reshape(-1)), self._whitened_columns(j.reshape(-1))
        values = (delta - (vi * vj).sum(0)) / self._damp
        return values.to(self.dtype).reshape(i.shape)

    # Checkpointing -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: window rows, the float64 Gram matrix and the count
        of pushes (plain tensors, ints, floats and strings: loadable with ``weights_only=True``).
        The Cholesky factor is not stored: it is recomputed from the Gram matrix, bit for bit."""
        return {
            "dim": self.dim, "window": self.window, "damp": self._damp, "storage_dtype": str(self.storage_dtype),
            "pushed": self._pushed, "grads": self._grads.clone(), "gram": self._gram.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from ``state_dict``; later results are bitwise those of the saved object.

        Everything is checked before anything changes: the keys, that dim, window, damp and storage
        dtype match this object's (construct it with the same arguments), the tensors' shapes,
        dtypes and finiteness, and that the Gram matrix is symmetric and its diagonal holds the
        rows' squared norms. A failed load raises ValueError naming the key and leaves the window
        bitwise unchanged."""
        grads, gram, pushed = validate_window_state(state, self.dim, self.window, self._damp, self.storage_dtype,
                                                    self._reduce)
        k = min(pushed, self.window)
        lower = self._factor(gram[:k, :k].to(self.device), grads[:k].to(self.device))
        self._grads.copy_(grads)
        self._gram.copy_(gram)
        self._lower = lower
        self._pushed = pushed


def window_nbytes(dim: int, window: int, dtype: torch.dtype) -> int:
    """Bytes a SlidingWindowFisherInverse of this size holds at its peak (rows plus 5 m x m float64)."""
    return window * dim * torch.empty(0, dtype=dtype).element_size() + 5 * window * window * 8


def validate_window_state(state, dim: int, window: int, damp: float, storage_dtype: torch.dtype, reduce=None):
    """Check a window's state dict against the expected sizes, without allocating anything of the
    size the state claims; returns (grads, gram, pushed). Raises ValueError naming the problem.
    ``reduce`` sums the rows' squared norms over the shards of a sharded window (a collective:
    every shard must load at once)."""
    if not isinstance(state, dict):
        raise ValueError(f"window state must be a dict from state_dict(), got {type(state).__name__}")
    required = {"dim", "window", "damp", "storage_dtype", "pushed", "grads", "gram"}
    missing = required - set(state)
    if missing:
        raise ValueError(f"window state is missing {sorted(missing)}; pass the output of state_dict()")
    unknown = set(state) - required - _LEGACY_KEYS
    if unknown:
        raise ValueError(f"window state has unknown keys {sorted(unknown)}; pass the output of state_dict()")
    for key, mine in (("dim", dim), ("window", window)):
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int) or value != mine:
            raise ValueError(f"window state has {key} = {value!r} but this window has {key} = {mine}; construct "
                             f"it with the same {key} as the one that was saved")
    if not isinstance(state["damp"], float) or state["damp"] != damp:
        raise ValueError(f"window state has damp = {state['damp']!r} but this window has damp = {damp!r}; "
                         f"construct it with the same damp")
    if state["storage_dtype"] != str(storage_dtype):
        raise ValueError(f"window state has storage_dtype = {state['storage_dtype']!r} but this window stores "
                         f"{storage_dtype}; construct it with the same dtype")
    pushed = state["pushed"]
    if isinstance(pushed, bool) or not isinstance(pushed, int) or pushed < 0:
        raise ValueError(f"window state has pushed = {pushed!r}; it must be an int >= 0")
    grads, gram = state["grads"], state["gram"]
    for key, tensor, shape, dtype in (("grads", grads, (window, dim), storage_dtype),
                                      ("gram", gram, (window, window), torch.float64)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"window state's {key} must be a tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"window state's {key} has shape {tuple(tensor.shape)}, expected {shape}")
        if tensor.dtype != dtype:
            raise ValueError(f"window state's {key} is {tensor.dtype}, expected {dtype}: the window must load as "
                             f"saved, without a change of dtype")
        if not all_finite(tensor):
            raise ValueError(f"window state's {key} contains NaN or Inf")
    k = min(pushed, window)
    if not torch.equal(gram, gram.T):
        raise ValueError("window state's gram is not symmetric; it does not come from state_dict()")
    if bool(grads[k:].any()) or bool(gram[k:].any()):
        raise ValueError(f"window state holds data beyond the {k} gradients that pushed = {pushed} implies")
    norms = grads[:k].to(torch.float64).square().sum(1)
    if reduce is not None:
        norms = reduce(norms.to(gram.device))
    if not torch.allclose(gram.diagonal()[:k], norms, rtol=1e-3, atol=1e-30):
        raise ValueError("window state's gram does not match its grads (the diagonal must hold the rows' squared "
                         "norms); the two tensors come from different states")
    return grads, gram, pushed
