"""The sliding-window Fisher inverse: the dynamic M-FAC algorithm behind the optimizer.

A ring buffer holds the last ``window`` gradients G (k, d), k = min(pushed, window), and the
object answers F^-1 x for F = damp*I + G^T G / k through the Woodbury identity

    F^-1 x = (x - G^T K^-1 G x) / damp,        K = k*damp*I + G G^T   (k x k).

It keeps the float64 Gram matrix S = G G^T, whatever the window's storage dtype (each entry is one
dot product, so S is exact up to the rounding of that product), and the Cholesky factor K = U^T U
in the age order of the gradients. Once the window is full, a push updates U in O(k^2): the oldest
gradient's row and column leave (a rank-one update of the rest, by Givens rotations) and the new
one's arrive (one triangular solve), checked by a probe product against K and refactorised from S,
O(k^3 / 3), when it has drifted or the compiled kernel is not available (:mod:`mfac.fisher.woodbury`;
BENCHMARKS.md#sliding-static-and-block-inverses). Every product with K^-1 is a pair of triangular
solves with U: backward stable, like the static inverse (an explicit K^-1 updated by low-rank
corrections is accurate only to eps * cond(K), an error the Woodbury subtraction multiplies by cond(F)).

For the gradient just pushed, g = G^T e_j, the product needs no subtraction at all:

    F^-1 g = k * G^T K^-1 e_j,

so ``push_ihvp`` reads the window exactly twice (G g for the new row of S, then G^T a) and adds
no cancellation. A push is staged first (:meth:`SlidingWindowFisherInverse.stage`, nothing
changes), then committed (:meth:`~SlidingWindowFisherInverse.commit`) only when the gradient, its dot
products and the result are finite: a refused push leaves the window bitwise unchanged. Every
product G x goes through one method, the single place where a sharded window all-reduces an
m-vector.

How the rows are stored is a storage form (:mod:`mfac.fisher.rows`: dense in float32, float64 or a
half precision, or compressed); the algebra here is the same for all.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch

from .base import (FisherInverse, NonFiniteGradientError, all_finite, check_damp, check_finite, check_floating,
                   check_positive_int, compute_dtype, push_refusal)
from .rows import DenseRows
from . import window_state, woodbury
from .woodbury import Factor

__all__ = ["SlidingWindowFisherInverse", "StagedPush", "window_nbytes", "GRAM_COPIES"]

GRAM_COPIES = 6  # m x m float64 matrices held at the peak of a push: S, its staged copy, the shifted matrix, factors


def window_nbytes(dim: int, window: int, dtype: torch.dtype) -> int:
    """Bytes a dense SlidingWindowFisherInverse holds at its peak: its rows plus 6 m x m float64."""
    return DenseRows.nbytes_for(dim, window, dtype) + GRAM_COPIES * window * window * 8


@dataclass
class StagedPush:
    """A push computed by :meth:`SlidingWindowFisherInverse.stage` but not yet applied: everything
    :meth:`~SlidingWindowFisherInverse.commit` needs, and F^-1 g when it was asked for. It applies
    only to the window state it was staged on, once: after the commit it is spent, and the window
    may reuse the memory of ``stored`` and, once another push is committed, of ``factor``."""

    slot: int  # the ring-buffer slot g replaces
    stored: torch.Tensor  # g as the window will hold it (rounded, or compressed), dense, compute dtype
    payload: object  # what the storage form writes for it
    dots: torch.Tensor  # (k,) float64: the new row and column of S
    factor: Factor  # the Cholesky factor of K after the push
    generation: int  # which state of the window this was staged on (see _check_current)
    owner: weakref.ref = field(repr=False)  # the window it was staged on
    direction: torch.Tensor | None = None  # F^-1 g with g in the window, when asked for


def _unreduced(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


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
        storage: for subclasses, a storage form other than dense rows (see :mod:`mfac.fisher.rows`).

    Memory: window*d numbers in ``dtype`` plus 3*window^2 float64 numbers (S, its factor, the storage
    of the factor it replaced, reused by the next push), up to 6*window^2 while a push is staged;
    refused before allocating where that does not fit in the memory available on ``device``.
    Until ``window`` gradients have arrived, F is normalised by the number held, never by ``window``.
    Accuracy: backward stable, relative error within a small multiple of eps * cond(F) for every
    input (eps of the compute dtype), as the static inverse.
    """

    def __init__(self, dim: int, window: int, damp: float, dtype: torch.dtype = torch.float32, device=None,
                 reduce=None, *, storage=None):
        dim = check_positive_int("dim", dim)
        window = check_positive_int("window", window)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
        check_floating("dtype", dtype)
        self._damp = check_damp(damp, compute_dtype(dtype))
        if reduce is not None and not callable(reduce):
            raise TypeError(f"reduce must be callable or None, got {type(reduce).__name__}")
        self._dim, self._window, self._storage_dtype = dim, window, dtype
        self._device = torch.device(device) if device is not None else torch.empty(0).device
        self._sharded = reduce is not None
        self._reduce = reduce if reduce is not None else _unreduced
        self._rows = storage if storage is not None else DenseRows(dim, window, dtype, self._device)
        self._gram = torch.zeros(window, window, dtype=torch.float64, device=self._device)
        self._factor = Factor(torch.zeros(0, 0, dtype=torch.float64, device=self._device))
        self._spare: torch.Tensor | None = None  # a replaced reusable factor's storage, for the next update
        self._probe: torch.Tensor | None = None
        self._pushed = 0
        # Bumped by every change of state (commit, extend, load): a push staged on an earlier state,
        # including one committed already and then restored, is refused (its buffers may be reused).
        self._generation = 0

    dim = property(lambda self: self._dim)
    window = property(lambda self: self._window, doc="m, the capacity of the window.")
    num_grads = property(lambda self: min(self._pushed, self.window))
    pushed = property(lambda self: self._pushed, doc="How many gradients have been pushed in total.")
    damp = property(lambda self: self._damp)
    device = property(lambda self: self._device)
    storage_dtype = property(lambda self: self._storage_dtype)
    dtype = property(lambda self: compute_dtype(self._storage_dtype))
    storage = property(lambda self: self._rows, doc="The storage form of the rows (see :mod:`mfac.fisher.rows`).")
    reduce = property(lambda self: self._reduce,
                      doc="The sum over the shards of a sharded window (the identity for a whole window).")
    route = property(lambda self: "primal" if self.dim <= self.window and not self._sharded else "dual",
                     doc="'dual' (k x k factor, d > window, or sharded) or 'primal' (d x d factor, d <= window).")

    @property
    def nbytes(self) -> int:
        held = (self._gram, self._factor.upper) + ((self._spare,) if self._spare is not None else ())
        return self._rows.nbytes + sum(t.numel() * t.element_size() for t in held)

    # Window products: the only passes over G ------------------------------------------------------

    def _window_dots(self, vectors: torch.Tensor, rows: int | None = None, replace: tuple | None = None) -> torch.Tensor:
        """G x for x of shape (d,) or (d, n) over the first ``rows`` slots (default: those held),
        (rows,) or (rows, n) float64, summed over the shards. ``replace=(slot, g)`` takes g as row
        ``slot``."""
        out = self._rows.dots(vectors, self.num_grads if rows is None else rows)
        if replace is not None:
            slot, row = replace
            out[slot] = (row.to(self.dtype) @ vectors).to(torch.float64)
        return self._reduce(out)

    def _all_finite(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is finite on every shard (so all shards take the same decision)."""
        if not self._sharded:
            return all_finite(tensor)
        flag = torch.zeros(1, dtype=torch.float64, device=self.device)
        flag[0] = 0.0 if all_finite(tensor) else 1.0
        return float(self._reduce(flag)[0]) == 0.0

    def _refactor(self, gram: torch.Tensor, rows: torch.Tensor | None, pushed: int) -> Factor:
        """The factor from scratch for the window holding ``gram`` after ``pushed`` pushes."""
        return woodbury.factor(gram, rows, self._damp, self.route == "primal", pushed % self.window)

    def _updated_factor(self, slot: int, dots: torch.Tensor) -> Factor | None:
        """The factor after g (its dot products ``dots``, slot order) replaces the oldest gradient of
        a full window, by an O(m^2) update; None where the update cannot run or the probe says it
        has drifted from K, and the caller refactorises. Nothing of the window is changed."""
        m, offset = self.window, (self._pushed + 1) % self.window
        if self._probe is None or self._probe.shape[0] != m:
            self._probe = window_state.probe_vector(m, self.device)
        ages = torch.roll(dots, -offset)
        z = torch.roll(self._probe, offset)  # the probe in slot order
        spare, self._spare = self._spare, None  # the staged factor owns it now
        result = woodbury.shifted(self._factor, ages[:-1], float(ages[-1]) + m * self._damp, offset, self._probe,
                                  check=(self._gram, z), out=spare)
        if result is None:
            self._spare = spare  # still zero below its diagonal
            return None
        candidate, product, k_times_z = result  # K_new z, from the old S z with row and column `slot` replaced:
        k_times_z.add_(dots - self._gram[slot], alpha=float(z[slot]))  # S's row: its column, read in order
        k_times_z[slot] = dots @ z
        k_times_z.add_(z, alpha=m * self._damp)
        if not woodbury.drift(product, candidate.to_age(k_times_z)) <= woodbury.drift_tolerance(m):  # NaN too
            self._spare = candidate.upper
            return None
        return candidate

    # Pushing: stage (no change), then commit ------------------------------------------------------

    def stage(self, g: torch.Tensor, direction: bool = True) -> StagedPush:
        """Compute everything a push of g (shape (d,)) changes, and with ``direction`` F^-1 g with g
        in the window, without changing the window. Raises NonFiniteGradientError (a ValueError)
        for a g that cannot enter, or whose F^-1 g is not finite. Apply the result with
        :meth:`commit`, or drop it: nothing has changed. Cost: one read of the window (two with
        ``direction``) plus O(window^2) once the window is full (O(window^3 / 3) while it fills, or
        when the factor is refactorised)."""
        g = self._check_gradient(g)
        stored, payload = self._rows.encode(g)
        slot = self._pushed % self.window
        k = min(self._pushed + 1, self.window)
        dots = self._window_dots(stored, rows=k, replace=(slot, stored))  # row `slot` becomes g
        # NaN or Inf in g makes its dot products non-finite, so the window pass doubles as the check;
        # only then is g scanned, to tell a non-finite gradient from one too large for the dtype.
        if not all_finite(dots):
            raise push_refusal(g, stored, self.storage_dtype, self._all_finite(g))
        factor = None
        if self.route == "dual" and self._pushed >= self.window >= woodbury.SMALLEST_UPDATED:
            factor = self._updated_factor(slot, dots)
        if factor is None:
            gram = self._gram[:k, :k].clone()
            gram[slot, :] = dots
            gram[:, slot] = dots
            rows = None
            if self.route == "primal":  # at most window x window numbers
                rows = self._rows.held(k).clone()
                rows[slot] = stored.to(self.storage_dtype)
            factor = self._refactor(gram, rows, self._pushed + 1)
        staged = StagedPush(slot, stored, payload, dots, factor, self._generation, weakref.ref(self))
        if direction and self.route == "primal":
            staged.direction = woodbury.primal_apply(stored, staged.factor, k, self._damp, self.dtype)
        elif direction:
            # F^-1 g = k G_new^T K_new^-1 e_j. G_new differs from the stored rows in row j only, so
            # G_new^T a = (G_old^T a with a_j = 0) + a_j g: the window is read once and not yet written.
            coeffs = staged.factor.solve_newest()  # K^-1 e_slot: g is the newest gradient
            weight = float(coeffs[slot]) * k
            coeffs[slot] = 0.0
            staged.direction = self._rows.combine(stored, coeffs, weight, float(k), k)
        if direction and not self._all_finite(staged.direction):
            largest = float(torch.linalg.vector_norm(stored, ord=math.inf))
            raise NonFiniteGradientError(
                f"F^-1 g overflows {self.dtype} (damp = {self._damp:g} is too small for gradients of size "
                f"{largest:.3g}); the window was left unchanged")
        return staged

    def staged_ihvp(self, staged: StagedPush, x: torch.Tensor) -> torch.Tensor:
        """F^-1 x for x (d,) as it will be once ``staged`` is committed, without changing anything:
        the staged row stands in for the one it replaces. Two reads of the window. Raises
        NonFiniteGradientError if the result is not finite."""
        self._check_current(staged)
        x = self._check_vectors(x)
        k = staged.dots.shape[0]
        if self.route == "primal":
            out = woodbury.primal_apply(x, staged.factor, k, self._damp, self.dtype)
        else:
            coeffs = staged.factor.solve(self._window_dots(x, rows=k, replace=(staged.slot, staged.stored)))
            weight = float(coeffs[staged.slot])
            coeffs[staged.slot] = 0.0  # the old row in that slot: its part is the staged row's, added below
            out = self._rows.combine(x, coeffs, 1.0 / self._damp, -1.0 / self._damp, k)
            out.add_(staged.stored, alpha=-weight / self._damp)
        if not self._all_finite(out):
            raise NonFiniteGradientError(f"F^-1 x overflows {self.dtype} (damp = {self._damp:g} is too small for "
                                         f"this x); the window was left unchanged")
        return out

    def commit(self, staged: StagedPush) -> None:
        """Apply a push staged by :meth:`stage` on this window, with no push in between."""
        self._check_current(staged)
        k = staged.dots.shape[0]
        self._rows.write(staged.slot, staged.payload)
        self._gram[staged.slot, :k] = staged.dots
        self._gram[:k, staged.slot] = staged.dots
        old, self._factor = self._factor, staged.factor
        if old.reusable and old.size == self.window:  # nothing may use it now: stale pushes are refused
            self._spare = old.upper
        self._pushed += 1
        self._generation += 1

    def _check_current(self, staged: StagedPush) -> None:
        if staged.owner() is not self:
            raise ValueError("this push was staged on another window; stage it again on this one")
        if staged.generation != self._generation:
            raise ValueError("this push was committed already, or staged before another push was committed; "
                             "stage it again")

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
        window unchanged. Cost: one pass over the window plus O(window^2) (see :meth:`stage`)."""
        self.commit(self.stage(g, direction=False))

    def push_ihvp(self, g: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Push g, then return F^-1 g with g already in the window, shape (d,), in ``dtype``; or,
        with ``x`` (shape (d,)), F^-1 x with g in the window.

        The window's copy of g is what both the update and the product use, so with a half-precision
        window this is F^-1 of g rounded to that precision (and with a compressed window, of the
        compressed g). If g or the result is not finite, NonFiniteGradientError is raised and the
        window is unchanged. Cost: two passes over the window (G g, then G^T a) plus O(window^2)
        once the window is full (see :meth:`stage`); one more with ``x``.
        """
        if x is not None:
            x = self._check_vectors(x)
            if x.dim() != 1:
                raise ValueError(f"x must have shape ({self.dim},), got {tuple(x.shape)}")
        staged = self.stage(g, direction=x is None)
        direction = staged.direction if x is None else self.staged_ihvp(staged, x)
        self.commit(staged)
        return direction

    def extend(self, grads: torch.Tensor) -> None:
        """Push the rows of ``grads`` (n, d) in order, as n calls to ``push`` would, but with one
        factorisation: O(k^2 d + k^3) with k = min(n + held, window) (dense rows: one Gram GEMM).
        Use it to warm-start a window from a batch. A non-finite row rejects the whole batch and
        leaves the window unchanged; an empty batch changes nothing."""
        if not isinstance(grads, torch.Tensor) or grads.dim() != 2 or grads.shape[1] != self.dim:
            shape = tuple(grads.shape) if isinstance(grads, torch.Tensor) else type(grads).__name__
            raise ValueError(f"grads must be a tensor of shape (n, {self.dim}), got {shape}")
        check_floating("grads", grads.dtype)
        if grads.device != self.device:
            raise ValueError(f"grads is on {grads.device} but the window lives on {self.device}")
        check_finite("grads", grads)
        if grads.shape[0] == 0:
            return
        batch = self._rows.stage_batch(grads, self._pushed, self._gram, self._reduce)
        if not all_finite(batch.gram):
            raise NonFiniteGradientError(f"grads are finite but their dot products overflow {self.dtype}; scale them "
                                         f"down or use a float64 window; the window was left unchanged")
        factor = self._refactor(batch.gram, batch.rows, self._pushed + grads.shape[0])
        k = batch.gram.shape[0]
        batch.commit()
        self._gram[:k, :k] = batch.gram
        self._factor, self._spare = factor, None
        self._pushed += grads.shape[0]
        self._generation += 1

    def ihvp(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_vectors(x)
        vectors = x.mT if x.dim() == 2 else x  # (d,) or (d, n)
        if self.route == "primal":
            out = woodbury.primal_apply(vectors, self._factor, self.num_grads, self._damp, self.dtype)
        else:
            coeffs = self._factor.solve(self._window_dots(vectors))
            out = self._rows.combine(vectors, coeffs, 1.0 / self._damp, -1.0 / self._damp, self.num_grads)
        return out.mT.contiguous() if x.dim() == 2 else out

    def rows(self) -> torch.Tensor:
        """The gradients held, as the window stores them (rounded, or compressed), dense: a
        (num_grads, d) float64 tensor in slot order (F does not depend on the order). O(num_grads * d)
        memory: for tests, inspection and small problems."""
        return self._rows.columns(torch.arange(self.dim, device=self.device), self.num_grads)

    # Entries of F^-1 ------------------------------------------------------------------------------

    def _whitened_columns(self, index: torch.Tensor) -> torch.Tensor:
        """Dual route: U^-T G[:, index]; primal route: U^-T e_index. float64, (rows of U, len(index))."""
        if self.route == "primal":
            columns = torch.zeros(self.dim, index.numel(), dtype=torch.float64, device=self.device)
            columns[index, torch.arange(index.numel(), device=self.device)] = 1.0
        else:
            columns = self._rows.columns(index, self.num_grads)
        return self._factor.whiten(columns)

    def _primal_entries(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Primal route: [F^-1]_ij = k (U^-T e_i) . (U^-T e_j) for index vectors i, j (float64)."""
        k = self.num_grads
        if k == 0:
            return (i == j).to(torch.float64) / self._damp
        return k * (self._whitened_columns(i) * self._whitened_columns(j)).sum(0)

    def diag(self) -> torch.Tensor:
        """diag(F^-1) = (1 - ||U^-T G[:, q]||^2) / damp, shape (d,). Cost O(d window^2)."""
        if self.route == "primal":
            index = torch.arange(self.dim, device=self.device)
            return self._primal_entries(index, index).to(self.dtype)
        out = torch.empty(self.dim, dtype=self.dtype, device=self.device)
        step = self._rows.diag_chunk or max(1, (1 << 22) // max(self.num_grads, 1))  # about 32 MB of float64
        for c0 in range(0, self.dim, step):
            index = torch.arange(c0, min(c0 + step, self.dim), device=self.device)
            out[c0: c0 + step] = (1.0 - self._whitened_columns(index).square().sum(0)) / self._damp
        return out

    def element(self, i, j) -> torch.Tensor:
        """[F^-1]_ij = (delta_ij - (U^-T G[:, i]) . (U^-T G[:, j])) / damp. Cost O(window^2) per pair."""
        i, j = self._check_pair(i, j)
        if self.route == "primal":
            return self._primal_entries(i.reshape(-1), j.reshape(-1)).to(self.dtype).reshape(i.shape)
        delta = (i == j).to(torch.float64).reshape(-1)
        vi, vj = self._whitened_columns(i.reshape(-1)), self._whitened_columns(j.reshape(-1))
        values = (delta - (vi * vj).sum(0)) / self._damp
        return values.to(self.dtype).reshape(i.shape)

    # Checkpointing -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: the settings, the storage form's tensors (dense
        rows; or values, offsets and residual), the float64 Gram matrix, the Cholesky factor and the
        count of pushes (plain tensors, ints, floats and strings: loadable with ``weights_only=True``).
        The factor's updates depend on the order of the pushes, so it is saved rather than
        recomputed: a (window, window) float64 tensor holding U in its leading k x k block, zero
        elsewhere; all zero on the primal route, whose factor is recomputed from the rows exactly."""
        factor = torch.zeros(self.window, self.window, dtype=torch.float64, device=self.device)
        if self.route == "dual":
            size = self._factor.size
            factor[:size, :size] = self._factor.upper
        return {"dim": self.dim, "window": self.window, "damp": self._damp, "storage_dtype": str(self.storage_dtype),
                **self._rows.settings(), "pushed": self._pushed, **self._rows.state_tensors(),
                "gram": self._gram.clone(), "factor": factor}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from ``state_dict``; later results are bitwise those of the saved object.

        Everything is checked before anything changes (:func:`mfac.fisher.window_state.validate`):
        the keys, that the settings match this object's (construct it with the same arguments), the
        tensors' shapes, dtypes and finiteness, the storage form's own invariants, that the Gram
        matrix is symmetric and its diagonal holds the rows' squared norms, and that the factor is
        one of K. The factor is refactorised from the Gram matrix (or, on the primal route, the rows)
        where the state has none: written before factors were saved, all zero (the primal route's,
        or a template never filled). A failed load raises ValueError naming the key and leaves the
        window bitwise unchanged."""
        k = window_state.validate(state, self)
        tensors = {name: state[name].to(self.device) for name in self._rows.tensor_spec()}
        gram = state["gram"].to(self.device)
        if window_state.holds_factor(state, self):
            upper = state["factor"][:k, :k].to(self.device).clone(memory_format=torch.contiguous_format)
            factor = Factor(upper, state["pushed"] % self.window % k, reusable=True)  # zero below: validated
        else:
            rows = tensors["grads"][:k] if self.route == "primal" else None  # the primal route: dense rows only
            factor = self._refactor(gram[:k, :k], rows, state["pushed"])
        self._rows.load(tensors)
        self._gram.copy_(gram)
        self._factor, self._spare = factor, None
        self._pushed = state["pushed"]
        self._generation += 1

