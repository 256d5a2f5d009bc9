"""The common protocol of every Fisher-inverse object, and the input checks they share.

Every class in :mod:`mfac.fisher` represents the inverse of a damped empirical Fisher

    F = damp * I + (1/m) * G^T G,        G: (m, d), one gradient per row,

where ``m`` is the number of gradients actually held (``num_grads``), never a capacity.
They all answer the same questions, so a consumer (optimizer, pruner) never needs to know
which one it holds:

* ``ihvp(x)``: F^-1 x for x of shape (d,) or a batch (k, d); result in ``dtype``.
* ``diag()``: the (d,) diagonal of F^-1.
* ``element(i, j)``: [F^-1]_ij; ``i`` and ``j`` are ints or equal-length index tensors.
* ``column(j)``: the (d,) column j of F^-1.
* ``submatrices(index)``: [F^-1] on each row of an (n, s) index tensor, (n, s, s) (group OBS).
* ``block_size``: coordinates are coupled only within consecutive blocks of this size (d if dense).
* ``dim``, ``num_grads``, ``damp``, ``device``, ``dtype`` (the dtype of every returned tensor),
  ``nbytes`` (bytes of tensor state held).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

__all__ = ["FisherInverse", "NonFiniteGradientError"]

_HALF_TYPES = (torch.float16, torch.bfloat16)


class NonFiniteGradientError(ValueError):
    """A gradient holding NaN or Inf was refused; the object that refused it is unchanged."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in for data stored as ``dtype``: half types accumulate in float32."""
    return torch.float32 if dtype in _HALF_TYPES else dtype


def check_positive_int(name: str, value) -> int:
    """Return ``value`` if it is an int >= 1 (not a bool), else raise ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def check_damp(damp, dtype: torch.dtype | None = None) -> float:
    """Return ``damp`` as a float, or raise if it is not a finite number > 0; with ``dtype`` (the
    dtype results are computed in), also if 1/damp would overflow there (damp below the smallest
    normal number, e.g. 1.2e-38 for float32)."""
    if isinstance(damp, bool) or not isinstance(damp, (int, float)):
        raise TypeError(f"damp must be a positive number, got {type(damp).__name__}")
    damp = float(damp)
    if not math.isfinite(damp) or damp <= 0:
        raise ValueError(f"damp must be a finite number > 0 (it is the lambda in lambda*I + G^T G/m), got {damp}")
    if dtype is not None and damp < torch.finfo(dtype).tiny:
        raise ValueError(f"damp = {damp:g} is below the smallest normal {dtype} number "
                         f"({torch.finfo(dtype).tiny:.3g}), so F^-1 = 1/damp on the complement of the gradients "
                         f"overflows; use damp >= {torch.finfo(dtype).tiny:.3g} or compute in float64")
    return damp


def check_damping(damp, relative_damp) -> tuple[float | None, float | None]:
    """Exactly one of an absolute ``damp`` and a ``relative_damp`` (a fraction of the mean Fisher
    diagonal), each a finite number > 0; returns (damp, None) or (None, relative_damp)."""
    if damp is not None and relative_damp is not None:
        raise ValueError("pass either damp (absolute) or relative_damp (a fraction of the mean Fisher diagonal), "
                         "not both")
    if damp is not None:
        return check_damp(damp), None
    if relative_damp is None:
        raise ValueError("damp is None: pass an absolute damp > 0, or relative_damp (e.g. 0.3)")
    if isinstance(relative_damp, bool) or not isinstance(relative_damp, (int, float)) \
            or not 0 < float(relative_damp) < math.inf:
        raise ValueError(f"relative_damp must be a finite number > 0 (a fraction of the mean Fisher diagonal, "
                         f"e.g. 0.3), got {relative_damp!r}")
    return None, float(relative_damp)


def check_floating(name: str, dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise TypeError(
            f"{name} must have a floating dtype (float32, float64, bfloat16 or float16), got {dtype}; "
            f"convert it with .float()"
        )


def finite_flag(tensor: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor, True when no element of ``tensor`` is NaN or Inf, without a host sync
    (flags of several tensors combine with ``&``). One read of the tensor and no large temporary:
    min and max propagate NaN and expose an Inf, where ``torch.isfinite(t).all()`` would also
    write a boolean tensor as large as ``t``."""
    if tensor.numel() == 0 or not (tensor.dtype.is_floating_point or tensor.dtype.is_complex):
        return torch.ones((), dtype=torch.bool, device=tensor.device)
    if tensor.dtype.is_complex:
        tensor = torch.view_as_real(tensor)
    return torch.isfinite(torch.stack(torch.aminmax(tensor))).all()


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element of ``tensor`` is NaN or Inf (see :func:`finite_flag`)."""
    return bool(finite_flag(tensor))


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not all_finite(tensor):
        raise NonFiniteGradientError(f"{name} contains NaN or Inf; non-finite gradients cannot enter a Fisher estimate")


def push_refusal(g: torch.Tensor, stored: torch.Tensor, storage_dtype: torch.dtype,
                 g_finite: bool) -> NonFiniteGradientError:
    """The error for a window push whose dot products are not finite, saying why: g itself holds
    NaN or Inf (``g_finite`` False, on any shard), its copy ``stored`` in the storage dtype
    overflows, or its products overflow the compute dtype."""
    if not g_finite:
        return NonFiniteGradientError("g contains NaN or Inf; non-finite gradients cannot enter the window, "
                                      "which was left unchanged")
    if not all_finite(stored):
        largest = float(torch.linalg.vector_norm(g.to(torch.float64), ord=math.inf))
        return NonFiniteGradientError(
            f"g is finite but its largest entry {largest:.3g} exceeds the largest {storage_dtype} number "
            f"{torch.finfo(storage_dtype).max:.3g}, the window's storage dtype. Scale the loss down, clip "
            f"gradients, or use a bfloat16 or float32 window; the window was left unchanged")
    dtype = compute_dtype(storage_dtype)
    norm = float(torch.linalg.vector_norm(stored.to(torch.float64)))
    return NonFiniteGradientError(
        f"g is finite but too large for {dtype} products: its norm {norm:.3g} (or its dot product "
        f"with a gradient in the window) overflows {dtype}, whose largest value is "
        f"{torch.finfo(dtype).max:.3g}. Scale the loss down, clip gradients, or use a float64 window; "
        f"the window was left unchanged")


def check_gradients(grads) -> torch.Tensor:
    """Validate a gradient matrix G of shape (m, d): a floating, finite, 2-D tensor."""
    if not isinstance(grads, torch.Tensor):
        raise TypeError(f"grads must be a torch.Tensor of shape (m, d), got {type(grads).__name__}")
    if grads.dim() != 2:
        raise ValueError(
            f"grads must have shape (m, d) with one gradient per row, got shape {tuple(grads.shape)}; "
            f"for a single gradient use grads.unsqueeze(0)"
        )
    if grads.shape[1] == 0:
        raise ValueError("grads must have d >= 1 columns, got d = 0")
    check_floating("grads", grads.dtype)
    check_finite("grads", grads)
    return grads


def check_index(name: str, index, dim: int) -> torch.Tensor:
    """Turn an int or integer tensor of coordinates into a long tensor, checking the range."""
    if isinstance(index, bool):
        raise TypeError(f"{name} must be an int or an integer tensor, got bool")
    index = torch.as_tensor(index)
    if index.dtype.is_floating_point or index.dtype == torch.bool or index.is_complex():
        raise TypeError(f"{name} must be an int or an integer tensor, got dtype {index.dtype}")
    index = index.long()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= dim):
        raise IndexError(f"{name} has entries outside [0, {dim}): min {int(index.min())}, max {int(index.max())}")
    return index


def robust_cholesky(matrix: torch.Tensor, floor: float) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric matrix, or a batch of them, whose eigenvalues are
    >= ``floor`` > 0 in exact arithmetic (damp*I plus a Gram matrix).

    Round-off can still make such a matrix indefinite: a Gram matrix accumulated in float32, or a
    damp far below the gradients' scale. Where the plain factorisation fails, the eigenvalues are
    clamped from below (to ``floor``, raised if need be to what float64 can resolve at the matrix's
    scale), which is the nearest matrix that has the property the exact one has. Cost: one Cholesky,
    plus an eigendecomposition of the failed matrices only.
    """
    lower, info = torch.linalg.cholesky_ex(matrix)
    failed = info != 0
    if not bool(failed.any()):
        return lower
    batched = matrix.dim() > 2
    bad = matrix[failed] if batched else matrix[None]
    values, vectors = torch.linalg.eigh(bad)
    resolution = 16 * bad.shape[-1] * torch.finfo(bad.dtype).eps * values.abs().amax(-1, keepdim=True)
    values = torch.maximum(values, resolution.clamp_min(floor))
    repaired = torch.linalg.cholesky((vectors * values.unsqueeze(-2)) @ vectors.mT)
    if not batched:
        return repaired[0]
    lower[failed] = repaired
    return lower


class FisherInverse(ABC):
    """Abstract protocol shared by all Fisher-inverse objects; see the module docstring."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """d, the number of coordinates."""

    @property
    @abstractmethod
    def num_grads(self) -> int:
        """m, the number of gradients currently held (the normaliser in F)."""

    @property
    @abstractmethod
    def damp(self) -> float:
        """The damping lambda > 0."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the state lives and where results are returned."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """dtype of every tensor returned by ``ihvp``, ``diag``, ``element`` and ``column``."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of tensor state held by this object."""

    @abstractmethod
    def ihvp(self, x: torch.Tensor) -> torch.Tensor:
        """F^-1 x for x of shape (d,) or (k, d); returns the same shape in ``dtype``."""

    @abstractmethod
    def diag(self) -> torch.Tensor:
        """The diagonal of F^-1, shape (d,)."""

    @abstractmethod
    def element(self, i, j) -> torch.Tensor:
        """[F^-1]_ij; ``i``, ``j`` ints (0-d result) or equal-length index tensors (vector result)."""

    @property
    def block_size(self) -> int:
        """Coordinates are coupled only within consecutive blocks of this many (F^-1 is
        block-diagonal); ``dim`` when F^-1 is dense."""
        return self.dim

    def submatrices(self, index) -> torch.Tensor:
        """[F^-1] restricted to each row of ``index`` (n, s) (integer coordinates): (n, s, s), in
        ``dtype``. The default asks ``element`` for every pair: O(n s^2) entries at the cost of
        ``element``; block-diagonal objects answer with one batched product."""
        index = check_index("index", index, self.dim).to(self.device)
        if index.dim() != 2:
            raise ValueError(f"index must have shape (n, s), got {tuple(index.shape)}")
        n, s = index.shape
        return self.element(index[:, :, None].expand(n, s, s), index[:, None, :].expand(n, s, s))

    def column(self, j: int) -> torch.Tensor:
        """Column j of F^-1, shape (d,). Costs one ``ihvp``; subclasses override when cheaper."""
        j = self._column_index(j)
        unit = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        unit[j] = 1
        return self.ihvp(unit)

    def to_dense(self) -> torch.Tensor:
        """The explicit (d, d) matrix F^-1, built from ``ihvp`` of the identity. O(d^2) memory: for tests
        and small problems only."""
        return self.ihvp(torch.eye(self.dim, dtype=self.dtype, device=self.device))

    # Shared input handling -----------------------------------------------------------------------

    def _check_vectors(self, x, name: str = "x") -> torch.Tensor:
        """Validate x of shape (d,) or (k, d) and return it on our device in our dtype."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (d,) or (k, d), got {type(x).__name__}")
        if x.dim() not in (1, 2) or x.shape[-1] != self.dim:
            raise ValueError(
                f"{name} must have shape ({self.dim},) or (k, {self.dim}) to match this Fisher inverse's "
                f"dimension d = {self.dim}, got shape {tuple(x.shape)}"
            )
        check_floating(name, x.dtype)
        if x.device != self.device:
            raise ValueError(
                f"{name} is on {x.device} but this Fisher inverse lives on {self.device}; move it with "
                f".to('{self.device}')"
            )
        return x.to(self.dtype)

    def _column_index(self, j) -> int:
        index = check_index("j", j, self.dim)
        if index.numel() != 1:
            raise ValueError(f"j must be a single column index, got {index.numel()} of them")
        return int(index)

    def _check_pair(self, i, j) -> tuple[torch.Tensor, torch.Tensor]:
        i = check_index("i", i, self.dim).to(self.device)
        j = check_index("j", j, self.dim).to(self.device)
        if i.shape != j.shape:
            raise ValueError(f"i and j must have the same shape, got {tuple(i.shape)} and {tuple(j.shape)}")
        return i, j

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dim={self.dim}, num_grads={self.num_grads}, damp={self.damp:g}, "
            f"dtype={self.dtype}, device={self.device})"
        )
