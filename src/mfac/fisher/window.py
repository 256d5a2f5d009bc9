"""The sliding-window Fisher inverse: the dynamic M-FAC algorithm behind the optimizer.

A ring buffer holds the last ``window`` gradients G (k, d), k = min(pushed, window), and the
object answers F^-1 x for F = damp*I + G^T G / k through the Woodbury identity

    F^-1 x = (x - G^T K^-1 G x) / damp,        K = k*damp*I + G G^T   (k x k).

It keeps two small float64 matrices whatever the window's storage dtype: the Gram matrix
S = G G^T and the inverse K^-1. Pushing a gradient into slot j changes one row and one column of
S; K^-1 then changes by a symmetric rank-2 correction (remove the old row by a Schur-complement
downdate, border with the new one), done in O(k^2) instead of the O(k^3) refactorisation of the
published algorithm. K^-1 is rebuilt from S every ``refactor_every`` pushes, and whenever a pivot
loses positivity, so round-off cannot drift; the rebuild costs O(k^3) and no pass over G. While the
window is filling the shift k*damp changes with every push, which no low-rank update captures, so
each of the first ``window`` pushes rebuilds K^-1 (O(k^3) with k growing to ``window``).

``push_ihvp(g)`` reads the window exactly twice: one G g (which gives both the new row of S and
the right-hand side) and one G^T a fused with the scaling. All products G x go through
``_window_dots``, the single place where a sharded window would all-reduce an m-vector.
"""

from __future__ import annotations

import math

import torch

from .base import (FisherInverse, NonFiniteGradientError, check_damp, check_finite, check_floating, compute_dtype,
                   robust_cholesky)

__all__ = ["SlidingWindowFisherInverse"]

_HALF_CHUNK_ROWS = 64  # half-precision rows upcast to float32 at a time in window products


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class SlidingWindowFisherInverse(FisherInverse):
    """F^-1 over the last ``window`` gradients pushed, updated in O(d*window + window^2) per push.

    Args:
        dim: d, the length of every gradient.
        window: m, how many of the most recent gradients are kept.
        damp: lambda > 0.
        dtype: storage dtype of the window: float32, float64, bfloat16 or float16. Products with
            half-precision windows accumulate in float32, and results come back in float32
            (``dtype`` reports the result dtype, ``storage_dtype`` the window's).
        device: where the window lives (default: the current default device).
        refactor_every: rebuild the small inverse from scratch after this many incremental updates
            (default: ``window``, which keeps the rebuild's amortised cost O(window^2) per push).

    Memory: window*d numbers in ``dtype`` plus 2*min(d, window)^2 float64 numbers.
    Until ``window`` gradients have arrived, F is normalised by the number held, never by ``window``.
    When d <= window the object works with d x d matrices instead (``route == "primal"``): then
    (k*damp*I + G^T G) is the better-conditioned matrix to invert, and also the smaller one; its
    inverse gets a Sherman-Morrison update per push (add the new row, remove the old one).
    """

    def __init__(self, dim: int, window: int, damp: float, dtype: torch.dtype = torch.float32,
                 device=None, refactor_every: int | None = None):
        dim = _check_positive_int("dim", dim)
        window = _check_positive_int("window", window)
        self._damp = check_damp(damp)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
        check_floating("dtype", dtype)
        self._refactor_every = _check_positive_int("refactor_every", window if refactor_every is None else refactor_every)
        self._grads = torch.zeros(window, dim, dtype=dtype, device=device)
        small = min(dim, window)
        # dual route: G G^T and (k*damp*I + G G^T)^-1, k x k; primal route: G^T G and its shifted inverse, d x d.
        self._gram = torch.zeros(small, small, dtype=torch.float64, device=self._grads.device)
        self._inverse = torch.zeros_like(self._gram)
        self._pushed = 0
        self._since_refactor = 0

    dim = property(lambda self: self._grads.shape[1])
    window = property(lambda self: self._grads.shape[0], doc="m, the capacity of the window.")
    num_grads = property(lambda self: min(self._pushed, self.window))
    pushed = property(lambda self: self._pushed, doc="How many gradients have been pushed in total.")
    damp = property(lambda self: self._damp)
    device = property(lambda self: self._grads.device)
    storage_dtype = property(lambda self: self._grads.dtype)
    dtype = property(lambda self: compute_dtype(self._grads.dtype))
    refactor_every = property(lambda self: self._refactor_every)
    route = property(lambda self: "primal" if self.dim <= self.window else "dual",
                     doc="'dual' (window x window matrices, d > window) or 'primal' (d x d, d <= window).")
    nbytes = property(lambda self: sum(t.numel() * t.element_size() for t in (self._grads, self._gram, self._inverse)))

    # Window products: the only passes over G ------------------------------------------------------

    def _window_dots(self, vectors: torch.Tensor) -> torch.Tensor:
        """G x for x of shape (d,) or (d, n): returns (k,) or (k, n) in float64.

        This is the single reduction point: with the window's columns sharded across processes,
        each would compute its partial product here and all-reduce the small result.
        """
        grads = self._grads[: self.num_grads]
        if grads.dtype == self.dtype or grads.shape[0] == 0:
            return (grads.to(self.dtype) @ vectors).to(torch.float64)
        parts = [chunk.to(self.dtype) @ vectors for chunk in grads.split(_HALF_CHUNK_ROWS)]
        return torch.cat(parts).to(torch.float64)

    def _window_combine(self, vectors: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        """(x - G^T a) / damp for x of shape (d,) or (d, n) and a of shape (k,) or (k, n)."""
        grads = self._grads[: self.num_grads]
        coeffs = coeffs.to(self.dtype)
        beta, alpha = 1.0 / self._damp, -1.0 / self._damp
        product = torch.addmv if vectors.dim() == 1 else torch.addmm
        if grads.dtype == self.dtype:
            return product(vectors, grads.T, coeffs, beta=beta, alpha=alpha)
        out = vectors * beta
        for chunk, part in zip(grads.split(_HALF_CHUNK_ROWS), coeffs.split(_HALF_CHUNK_ROWS)):
            out = product(out, chunk.to(self.dtype).T, part, alpha=alpha)
        return out

    # The small state ----------------------------------------------------------------------------

    def _refactor(self, exact_gram: bool = False) -> None:
        """Rebuild the inverse of (k*damp*I + Gram) from the Gram matrix: O(min(d, k)^3).

        The dual Gram is exact by construction (each entry is one dot product); the primal one is a
        running sum of outer products, so ``exact_gram`` recomputes it from the window (O(k d^2)).
        """
        k = self.num_grads
        size = self.dim if self.route == "primal" else k
        if exact_gram and self.route == "primal":
            rows = self._grads[:k].to(torch.float64)
            torch.mm(rows.T, rows, out=self._gram)
        shifted = self._gram[:size, :size].clone()
        shifted.diagonal().add_(k * self._damp)
        self._inverse.zero_()
        self._inverse[:size, :size] = torch.cholesky_inverse(robust_cholesky(shifted, k * self._damp))
        self._since_refactor = 0

    def _replace_row(self, slot: int, dots: torch.Tensor) -> torch.Tensor | None:
        """Dual route: update K^-1 after row ``slot`` of a full window changed, its new dot products
        with the window being ``dots``; return K^-1 dots, or None if a pivot says to rebuild instead.

        Downdate: removing row j leaves A^-1 = P_{-j,-j} - p p^T / pi (p = P[:, j], pi = p_j), and
        zeros in row and column j of P - p p^T / pi. Border: with b = the new row of S off the
        diagonal, u = A^-1 b (u_j = 0) and gamma = shift + S_jj - b.u (>= shift > 0 in exact
        arithmetic), the new inverse is A^-1 + u u^T / gamma off row j, and -u / gamma, 1 / gamma
        on row and column j. With v = u - e_j both steps are one symmetric rank-2 update:
        P_new = P - p p^T / pi + v v^T / gamma, a single read and write of the m x m matrix.
        """
        shift = self.window * self._damp
        kinv = self._inverse
        p = kinv[:, slot].clone()
        pivot = float(p[slot])
        if not pivot > 0:
            return None
        off = dots.clone()
        off[slot] = 0
        v = kinv @ off
        v.sub_(p, alpha=float(p @ off) / pivot)
        v[slot] = 0
        gamma = shift + float(dots[slot]) - float(off @ v)
        if not gamma >= 0.5 * shift:
            return None
        v[slot] = -1.0
        factors = torch.stack([p, v], dim=1)
        weights = torch.tensor([-1.0 / pivot, 1.0 / gamma], dtype=torch.float64, device=kinv.device)
        kinv.addmm_(factors * weights, factors.T)
        # K_new^-1 dots in closed form: the off-diagonal part of dots is b, and A^-1 b = u is known.
        coeffs = v * (shift / gamma)
        coeffs[slot] += 1.0
        return coeffs

    def _swap_outer(self, new: torch.Tensor, old: torch.Tensor) -> bool:
        """Primal route: Sherman-Morrison for (A + new new^T - old old^T)^-1; False asks for a rebuild.

        Adding first keeps the intermediate matrix well conditioned; removing divides by
        1 - old^T A'^-1 old, the determinant ratio, which must stay clear of zero.
        """
        inv = self._inverse
        for vector, sign in ((new, 1.0), (old, -1.0)):
            w = inv @ vector
            denom = 1.0 + sign * float(vector @ w)
            if not denom > 1e-6:
                return False
            inv.addr_(w, w, alpha=-sign / denom)
        return True

    def _push(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Store g and update the state; return (the stored gradient in the compute dtype, and for
        the dual route K^-1 G g in float64)."""
        stored = self._check_gradient(g).to(self.storage_dtype).to(self.dtype)
        # One dot product doubles as the finiteness check (NaN/Inf in g make it non-finite), which
        # is cheaper than torch.isfinite's several passes over d.
        if not math.isfinite(float(torch.dot(stored, stored))):
            raise NonFiniteGradientError("g contains NaN or Inf (or its squared norm overflows); non-finite gradients "
                             "cannot enter the window, which was left unchanged")
        slot = self._pushed % self.window
        filling = self._pushed < self.window
        rebuild = filling or self._since_refactor >= self._refactor_every
        primal = self.route == "primal"
        # The primal route subtracts the outgoing row's outer product: copy it before it is overwritten.
        old = self._grads[slot].to(torch.float64, copy=True) if primal and not filling else None
        self._grads[slot] = stored
        self._pushed += 1
        if primal:
            new = stored.to(torch.float64)
            self._gram.addr_(new, new)
            if old is not None:
                self._gram.addr_(old, old, alpha=-1.0)
            if rebuild or not self._swap_outer(new, old):
                self._refactor(exact_gram=not filling)
            else:
                self._since_refactor += 1
            return stored, None
        dots = self._window_dots(stored)
        k = self.num_grads
        self._gram[slot, :k] = dots
        self._gram[:k, slot] = dots
        coeffs = None if rebuild else self._replace_row(slot, dots)
        if coeffs is None:
            self._refactor()
            coeffs = self._inverse[:k, :k] @ dots
        else:
            self._since_refactor += 1
        return stored, coeffs

    # Public API ----------------------------------------------------------------------------------

    def _check_gradient(self, g) -> torch.Tensor:
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"g must be a torch.Tensor of shape ({self.dim},), got {type(g).__name__}")
        if g.shape != (self.dim,):
            raise ValueError(f"g must have shape ({self.dim},) to match the window's dim, got {tuple(g.shape)}")
        check_floating("g", g.dtype)
        if g.device != self.device:
            raise ValueError(f"g is on {g.device} but the window lives on {self.device}; move it with .to('{self.device}')")
        return g

    def push(self, g: torch.Tensor) -> None:
        """Replace the oldest gradient by g, shape (d,). A non-finite g raises ValueError and leaves
        the window unchanged. Cost: one pass over the window plus amortised O(window^2)."""
        self._push(g)

    def extend(self, grads: torch.Tensor) -> None:
        """Push the rows of ``grads`` (n, d) in order, as n calls to ``push`` would, but with one
        matrix product and one rebuild: O(k^2 d + k^3) with k = min(n + held, window). Use it to
        warm-start a window from a batch of gradients. A non-finite row rejects the whole batch
        and leaves the window unchanged."""
        if not isinstance(grads, torch.Tensor) or grads.dim() != 2 or grads.shape[1] != self.dim:
            shape = tuple(grads.shape) if isinstance(grads, torch.Tensor) else type(grads).__name__
            raise ValueError(f"grads must be a tensor of shape (n, {self.dim}), got {shape}")
        check_floating("grads", grads.dtype)
        if grads.device != self.device:
            raise ValueError(f"grads is on {grads.device} but the window lives on {self.device}")
        check_finite("grads", grads)
        n = grads.shape[0]
        first = max(0, n - self.window)  # older rows would be overwritten within this call
        slots = torch.arange(self._pushed + first, self._pushed + n, device=self.device) % self.window
        self._grads[slots] = grads[first:].to(self.storage_dtype)
        self._pushed += n
        k = self.num_grads
        rows = self._grads[:k].to(self.dtype)
        gram = rows.T @ rows if self.route == "primal" else rows @ rows.T
        self._gram[: gram.shape[0], : gram.shape[1]] = gram
        self._refactor(exact_gram=True)

    def push_ihvp(self, g: torch.Tensor) -> torch.Tensor:
        """Push g, then return F^-1 g with g already in the window, shape (d,), in ``dtype``.

        The window's copy of g is what both the update and the product use, so with a half-precision
        window this is F^-1 of g rounded to that precision. Cost: two passes over the window
        (G g, then G^T a) plus amortised O(window^2).
        """
        stored, coeffs = self._push(g)
        if coeffs is None:
            return self._primal_apply(stored)
        return self._window_combine(stored, coeffs)

    def _primal_apply(self, x: torch.Tensor) -> torch.Tensor:
        """F^-1 x = k (k*damp*I + G^T G)^-1 x for x of shape (d,) or (n, d) (the inverse is symmetric)."""
        if not self.num_grads:
            return (x / self._damp).to(self.dtype)
        return (x.to(torch.float64) @ self._inverse * self.num_grads).to(self.dtype)

    def ihvp(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_vectors(x)
        if self.route == "primal":
            return self._primal_apply(x)
        k = self.num_grads
        vectors = x.mT if x.dim() == 2 else x  # (d,) or (d, n)
        coeffs = self._inverse[:k, :k] @ self._window_dots(vectors)
        out = self._window_combine(vectors, coeffs)
        return out.mT.contiguous() if x.dim() == 2 else out

    def _quadratic(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """Dual route: columnwise left_c^T K^-1 right_c for (k, n) float64 blocks of G."""
        k = self.num_grads
        return (left * (self._inverse[:k, :k] @ right)).sum(0)

    def diag(self) -> torch.Tensor:
        """diag(F^-1), shape (d,). Cost O(d window^2) (dual route), O(d) (primal route)."""
        if self.route == "primal":
            if not self.num_grads:
                return torch.full((self.dim,), 1.0 / self._damp, dtype=self.dtype, device=self.device)
            return (self._inverse.diagonal() * self.num_grads).to(self.dtype)
        k, out = self.num_grads, torch.empty(self.dim, dtype=self.dtype, device=self.device)
        step = max(1, (1 << 22) // max(k, 1))
        for c0 in range(0, self.dim, step):
            cols = self._grads[:k, c0 : c0 + step].to(torch.float64)
            out[c0 : c0 + step] = (1.0 - self._quadratic(cols, cols)) / self._damp
        return out

    def element(self, i, j) -> torch.Tensor:
        """[F^-1]_ij = (delta_ij - G[:, i]^T K^-1 G[:, j]) / damp. Cost O(window^2) per pair."""
        i, j = self._check_pair(i, j)
        k = self.num_grads
        delta = (i == j).to(torch.float64)
        if self.route == "primal":
            values = self._inverse[i, j] * k if k else delta / self._damp
            return values.to(self.dtype)
        gi = self._grads[:k, i.reshape(-1)].to(torch.float64)
        gj = self._grads[:k, j.reshape(-1)].to(torch.float64)
        values = (delta.reshape(-1) - self._quadratic(gi, gj)) / self._damp
        return values.to(self.dtype).reshape(i.shape)

    # Checkpointing -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: window rows, Gram matrix, K^-1 and counters."""
        return {
            "dim": self.dim, "window": self.window, "damp": self._damp, "storage_dtype": str(self.storage_dtype),
            "refactor_every": self._refactor_every, "pushed": self._pushed, "since_refactor": self._since_refactor,
            "grads": self._grads.clone(), "gram": self._gram.clone(), "inverse": self._inverse.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from ``state_dict``; later results are bitwise those of the saved object.

        The window's size, dim, damp and storage dtype must match this object's (construct it with
        the same arguments); tensors are copied without any change of dtype.
        """
        missing = {"dim", "window", "damp", "storage_dtype", "pushed", "since_refactor", "grads", "gram", "inverse"} - set(state)
        if missing:
            raise ValueError(f"state dict is missing {sorted(missing)}; pass the output of state_dict()")
        for key, mine in (("dim", self.dim), ("window", self.window), ("damp", self._damp),
                          ("storage_dtype", str(self.storage_dtype))):
            if state[key] != mine:
                raise ValueError(
                    f"state dict has {key} = {state[key]} but this window has {key} = {mine}; construct the "
                    f"SlidingWindowFisherInverse with the same {key} as the one that was saved"
                )
        if state["grads"].dtype != self.storage_dtype or state["gram"].dtype != torch.float64 \
                or state["inverse"].dtype != torch.float64:
            raise ValueError("state dict tensors were cast to another dtype; the window must load as saved "
                             f"({self.storage_dtype} rows, float64 Gram and inverse)")
        self._grads.copy_(state["grads"])
        self._gram.copy_(state["gram"])
        self._inverse.copy_(state["inverse"])
        self._pushed = int(state["pushed"])
        self._since_refactor = int(state["since_refactor"])
        self._refactor_every = int(state.get("refactor_every", self._refactor_every))
