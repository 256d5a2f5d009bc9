"""The M-FAC optimizer: steps preconditioned by a sliding window of recent gradients.

``MFAC`` follows ``torch.optim`` conventions: param groups are read inside ``step`` (so LR
schedulers and per-group settings work), ``step(closure)`` returns the closure's loss, parameters
whose ``.grad`` is None are skipped, and ``state_dict``/``load_state_dict`` resume exactly.

One step, as published (Frantar et al., 2021):

    g   <- grad + weight_decay * p          (coupled weight decay, per group; all params, one vector)
    u   <- F^-1 g                           (F over the last ``window`` gradients, g included)
    buf <- momentum * buf + u               (per group)
    p   <- p - lr * buf

With ``density < 1`` the window is compressed as in EFCP (Modoranu et al., 2023): the gradient plus
an error-feedback residual is cut to its largest entries, which enter the window
(:class:`mfac.fisher.CompressedWindowFisherInverse`), and u = F^-1 g of the full gradient (default)
or, as EFCP does, of the compressed one (``precondition="compressed"``).

The linear algebra lives in :mod:`mfac.fisher`, the arithmetic of the update in
:mod:`mfac.optim.functional`, the layout over processes in a distributor chosen at construction
(:mod:`mfac.distributed.distributors`); this class gathers the lists, calls them, and keeps the state.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from .. import defaults, resources
from ..distributed import choose_distributor, is_dtensor
from ..fisher import CompressedWindowFisherInverse, NonFiniteGradientError, SlidingWindowFisherInverse
from ..fisher.base import check_damp, compute_dtype
from ..fisher.compressed import check_density, compressed_nbytes
from ..fisher.window import window_nbytes
from .functional import as_number, check_group, check_hyper, clip_coefficient, flatten_gradients, mfac_update
from .saved import check_saved_state

__all__ = ["MFAC"]

_GLOBAL_KEYS = ("window", "damp", "window_dtype", "nonfinite", "density", "precondition", "max_grad_norm")


class MFAC(Optimizer):
    """M-FAC: SGD preconditioned by the inverse empirical Fisher of the last ``window`` gradients.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr: learning rate (per group). Published: 1e-3 for ResNets, 1e-4 for BERT fine-tuning.
        window: m, how many recent gradients form F (optimizer-wide). Memory: window * d numbers.
        damp: lambda in F = lambda*I + G^T G / m (optimizer-wide). Published: 1e-5 (ResNets),
            1e-6 (BERT). Smaller damp means larger, more curvature-driven steps.
        momentum: heavy-ball momentum on the preconditioned direction (per group), in [0, 1).
        weight_decay: L2 penalty (per group), added to the gradient before it enters the window.
        decoupled_weight_decay: if True (per group), shrink p by (1 - lr*weight_decay) instead of
            adding weight_decay*p to the gradient, as AdamW does; the window then sees raw gradients.
        window_dtype: storage dtype of the window (optimizer-wide); default: the parameters' dtype,
            float32 for bfloat16/float16 parameters. The small m x m state is float64 regardless.
        nonfinite: "skip" (default): a step that cannot be taken (a gradient with NaN/Inf or too
            large for the window's dtype, or an update that would make a parameter non-finite)
            changes nothing (parameters, window, momentum), counts in ``skipped_steps`` and warns
            once; "raise": raise FloatingPointError instead, also changing nothing.
        process_group: a ``torch.distributed`` process group (or ``torch.distributed.group.WORLD``)
            over which to shard the window by coordinates, for data-parallel training with
            replicated parameters (DDP): each process keeps a contiguous 1/world of every window
            row, the float64 m x m state is identical everywhere, and a step sends one m-vector
            all-reduce and one all-gather of the direction (see :mod:`mfac.distributed`). Every
            process must call ``step`` together, with the same (already averaged) gradients, and
            saves and loads its own ``state_dict``. Default None: one process holds the window.
            Parameters sharded by FSDP2 (``fully_shard``: DTensors, on a 1-D mesh or HSDP's 2-D
            one) need no process_group: each process's window covers its own shards, the group is
            the mesh's shard dimension, a step sends the same m-vector all-reduce and gathers nothing.
        density: fraction of each gradient's entries the window keeps (optimizer-wide), in (0, 1].
            Default 1.0: the exact dense window. Below 1 (e.g. 0.01 for windows of 1024 on
            transformers) each gradient plus an error-feedback residual is cut to its largest
            ceil(density * 8192) entries per block of 8192 coordinates; the window stores values
            (``window_dtype`` float32, the default, or bfloat16) and int16 offsets: window * d *
            density * 6 (or 4) bytes, plus d floats of residual. Needs d > window; not combined
            with process_group.
        precondition: with density < 1, what the step preconditions: "gradient" (default), the full
            gradient g, or "compressed", the compressed gradient that entered the window, as EFCP
            does. The full gradient costs one more read of the kept entries per step and trains
            better on the bundled tasks (BENCHMARKS.md#which-gradient-a-compressed-window-preconditions).
        max_grad_norm: clip the gradient to this global 2-norm before it enters the window and the
            step, as ``torch.nn.utils.clip_grad_norm_`` and Trainer's ``max_grad_norm`` do (without
            their epsilon, so after Trainer's own clipping it changes nothing). Default None: no
            clipping. Why it matters: F^-1 scales what lies outside the window's span by 1 / damp,
            so with a small damp (and a compressed window, which holds only part of each gradient)
            the step grows with the raw gradient. The transformer recipe
            (``mfac.defaults.TRANSFORMER_RECIPE``) sets 1.0: without clipping it stalls at chance on
            MiniLM/SST-2 (BENCHMARKS.md#clipping-and-the-transformer-recipe).

    All parameters of all groups form one vector of d coordinates and share one window, as in the
    published method; the window is created at the first ``step``, after which ``add_param_group``
    is refused.

    Frozen parameters are left out of the window: a parameter with ``requires_grad=False`` when its
    group is added (at construction, or by ``add_param_group``) stays in its param group, as in any
    torch optimizer, but has no coordinates in the window (nor in ``dim``, ``all_params``, the
    momentum or ``state_dict``), so a frozen embedding or backbone costs no window memory. The set
    is fixed then: unfreezing such a parameter later and giving it a gradient makes ``step`` raise
    RuntimeError (build MFAC again, after unfreezing, to train it); a trainable parameter that gets
    no gradient in a step is a zero slice of that step's gradient, as before.

    The constructor refuses settings that cannot work (damp below the smallest normal number of the
    window's dtype, lr beyond the parameters' dtype) and a window that cannot fit in the memory
    available, before any step. Cost per step: two reads of the window plus
    O(d + window^3 / 3); extra memory 3 d numbers (flat gradient, momentum, a staged update).
    Measured step times: BENCHMARKS.md#cost-of-one-step.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = defaults.MFAC_LR,
                 window: int = defaults.MFAC_WINDOW, damp: float = defaults.MFAC_DAMP, momentum: float = 0.0,
                 weight_decay: float = 0.0, decoupled_weight_decay: bool = False,
                 window_dtype: torch.dtype | None = None, nonfinite: str = "skip", process_group: Any = None,
                 density: float = 1.0, precondition: str = "gradient", max_grad_norm: float | None = None) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1 (the number of gradients kept), got {window!r}")
        if window_dtype is not None and (not isinstance(window_dtype, torch.dtype)
                                         or not window_dtype.is_floating_point):
            raise TypeError(f"window_dtype must be a floating torch.dtype or None, got {window_dtype!r}")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        self._density = check_density(density)
        if precondition not in ("gradient", "compressed"):
            raise ValueError(f"precondition must be 'gradient' or 'compressed', got {precondition!r}")
        self._precondition = precondition
        if max_grad_norm is not None:
            check_hyper("max_grad_norm", max_grad_norm, 0.0)
            if not as_number(max_grad_norm) > 0:
                raise ValueError("max_grad_norm must be > 0, or None for no clipping; got 0")
            max_grad_norm = float(as_number(max_grad_norm))
        self._max_grad_norm = max_grad_norm
        if self._density < 1 and process_group is not None:
            raise ValueError("density < 1 (a compressed window) cannot be combined with process_group yet; "
                             "shard a dense window (density=1.0) or compress on one process")
        if self._density < 1 and window_dtype not in (None, torch.float32, torch.bfloat16):
            raise TypeError(f"a compressed window (density < 1) stores float32 or bfloat16 values, got "
                            f"window_dtype={window_dtype!r}")
        self._window_size = window
        self._window_dtype = window_dtype
        self._nonfinite = nonfinite
        self._fisher: SlidingWindowFisherInverse | None = None
        self._flat_grad: torch.Tensor | None = None
        self._momentum: torch.Tensor | None = None
        self._steps = 0
        self._skipped = 0
        self._warned_nonfinite = False
        self._distributor = None
        self._frozen: set[int] = set()  # ids of the parameters left out of the window (frozen when added)
        defaults_ = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                         decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults_)
        if not self.all_params:
            raise ValueError("MFAC got no parameter with requires_grad=True (all of them are frozen), so there is "
                             "nothing to optimize; pass the trainable ones, e.g. [p for p in model.parameters() if "
                             "p.requires_grad]")
        if self._density < 1 and any(map(is_dtensor, self.all_params)):
            raise ValueError("density < 1 (a compressed window) cannot be combined with FSDP2's sharded parameters "
                             "yet; use density=1.0")
        self._distributor = choose_distributor(self.all_params, process_group, self.global_dim)
        dtype = self.storage_dtype
        self._damp = check_damp(damp, compute_dtype(dtype))
        vectors = 3 * self.dim * compute_dtype(dtype).itemsize  # flat gradient, momentum, staged update
        if self._density < 1:
            if self.dim <= window:
                raise ValueError(f"density < 1 needs more coordinates than the window holds gradients, got d = "
                                 f"{self.dim} and window = {window}; use density=1.0 (the dense window costs no "
                                 f"more for a model this small)")
            state = compressed_nbytes(self.dim, window, self._density, dtype)
        else:
            state = window_nbytes(self._distributor.window_dim(self.dim), window, dtype)
        resources.check_fits(state + vectors, self.device,
                             f"MFAC's state (a window of {window} gradients of {self.dim:,} coordinates in {dtype}"
                             f"{f' at density {self._density:g}' if self._density < 1 else ''}, plus 3 vectors of d)",
                             "lower window, or use window_dtype=torch.bfloat16, or density < 1")

    # Param groups and settings ---------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        for key in _GLOBAL_KEYS:
            if key in param_group:
                raise ValueError(f"{key} is optimizer-wide in MFAC (all groups share one window); pass it to "
                                 f"MFAC(...) rather than in a param group")
        if getattr(self, "_fisher", None) is not None:
            raise RuntimeError("MFAC cannot take a new param group after its first step: the window's dimension "
                               "is fixed then. Create the optimizer with all parameter groups instead")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        frozen = {id(p) for p in group["params"] if not p.requires_grad}
        try:
            for p in group["params"]:
                if id(p) not in frozen and not p.dtype.is_floating_point:
                    raise TypeError(f"MFAC needs floating parameters, got one of dtype {p.dtype}")
            check_group(group)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        self._frozen |= frozen

    def _window_groups(self) -> list[tuple[dict, list[torch.Tensor]]]:
        """(group, its parameters in the window) for every group, in order."""
        return [(group, [p for p in group["params"] if id(p) not in self._frozen]) for group in self.param_groups]

    @property
    def all_params(self) -> list[torch.Tensor]:
        """The parameters in the window, in order (the order of its coordinates): every parameter of
        every group but those that had ``requires_grad=False`` when their group was added."""
        return [p for _, params in self._window_groups() for p in params]

    def _check_frozen(self) -> None:
        """Refuse a step where a parameter left out of the window (frozen when added) has a gradient."""
        unfrozen = [tuple(p.shape) for group in self.param_groups for p in group["params"]
                    if id(p) in self._frozen and p.grad is not None]
        if unfrozen:
            raise RuntimeError(f"{len(unfrozen)} parameter(s) of shape(s) {unfrozen[:4]} had requires_grad=False when "
                               f"MFAC was built, so its window leaves them out, but they now have gradients; build "
                               f"MFAC again after unfreezing them (or give them another optimizer, or set their .grad "
                               f"to None)")

    @property
    def distributor(self) -> Any:
        """How the window is laid out over processes (:mod:`mfac.distributed.distributors`)."""
        return self._distributor

    def _local(self, tensor):
        return tensor if self._distributor is None else self._distributor.local(tensor)

    @property
    def dim(self) -> int:
        """d: the number of coordinates of all parameters together (of this process's shards, under FSDP2)."""
        return sum(self._local(p).numel() for p in self.all_params)

    @property
    def global_dim(self) -> int:
        """The number of coordinates of all parameters of the whole model (d, unless FSDP2 shards them)."""
        return sum(p.numel() for p in self.all_params)

    window_size = property(lambda self: self._window_size, doc="m, the number of gradients the window keeps.")
    damp = property(lambda self: self._damp, doc="The damping lambda of the window.")
    density = property(lambda self: self._density, doc="Fraction of each gradient's entries the window keeps.")
    max_grad_norm = property(lambda self: self._max_grad_norm, doc="The gradient's clipping norm (None: no clipping).")
    device = property(lambda self: self.all_params[0].device, doc="Where the parameters and the window live.")

    @property
    def storage_dtype(self) -> torch.dtype:
        """The dtype the window stores its rows in (``window_dtype``, or chosen from the parameters)."""
        if self._window_dtype is not None:
            return self._window_dtype
        dtypes = {compute_dtype(p.dtype) for p in self.all_params}
        return torch.float64 if torch.float64 in dtypes and self._density == 1 else torch.float32

    def _new_window(self, device) -> SlidingWindowFisherInverse:
        if self._density < 1:
            return CompressedWindowFisherInverse(self.dim, self._window_size, self._damp, self._density,
                                                 dtype=self.storage_dtype, device=device)
        return SlidingWindowFisherInverse(self._distributor.window_dim(self.dim), self._window_size, self._damp,
                                          dtype=self.storage_dtype, device=device, reduce=self._distributor.reduce)

    @property
    def fisher(self) -> SlidingWindowFisherInverse | None:
        """The sliding-window Fisher inverse (None before the first step). Read it, do not push to it."""
        return self._fisher

    @property
    def steps(self) -> int:
        """Steps taken (skipped steps not counted)."""
        return self._steps

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because the gradient or the update was not finite."""
        return self._skipped

    def _ensure_window(self) -> SlidingWindowFisherInverse:
        if self._fisher is None:
            params = self.all_params
            if not params:
                raise ValueError("MFAC has no parameters to optimize")
            sharded = [is_dtensor(p) for p in params]
            if any(sharded) and (not self._distributor.sharded_params or not all(sharded)):
                raise ValueError("MFAC's parameters changed form after construction: a param group added later "
                                 "mixes FSDP2 (DTensor) and plain parameters; build MFAC once the model is sharded, "
                                 "with all its parameters")
            devices = {p.device for p in params}
            if len(devices) > 1:
                raise ValueError(f"MFAC keeps one window for all parameters, so they must share a device; got "
                                 f"{sorted(map(str, devices))}")
            self._fisher = self._new_window(devices.pop())
            self._flat_grad = torch.zeros(self.dim, dtype=self._fisher.dtype, device=self._fisher.device)
        return self._fisher

    # The step ------------------------------------------------------------------------------------

    def _skip(self, reason: str) -> None:
        if self._nonfinite == "raise":
            raise FloatingPointError(f"MFAC refused step {self._steps + self._skipped + 1}: {reason}; parameters, "
                                     f"window and momentum were left unchanged")
        self._skipped += 1
        message = (f"MFAC skipped step {self._steps + self._skipped}: {reason}, so parameters, window and momentum "
                   f"were left unchanged ({self._skipped} skipped so far)")
        if not self._warned_nonfinite:
            warnings.warn(message + "; further skips are counted in skipped_steps without a warning",
                          RuntimeWarning, stacklevel=3)
            self._warned_nonfinite = True

    def _direction(self, fisher: SlidingWindowFisherInverse):
        """Push the flat gradient into the window (staged) and return (staged push, F^-1 g for all
        local coordinates); raises NonFiniteGradientError when the window refuses it."""
        params = self.all_params
        local = [self._local(p) for p in params]
        coupled = [0.0 if group["decoupled_weight_decay"] else as_number(group["weight_decay"])
                   for group, group_params in self._window_groups() for _ in group_params]
        grads = [self._local(p.grad) for p in params]
        scale = clip_coefficient(grads, self._max_grad_norm, self._distributor.total)
        flat = flatten_gradients(self._flat_grad, local, grads, coupled, scale)
        flat = self._distributor.window_part(flat)
        full_gradient = self._density < 1 and self._precondition == "gradient"
        staged = fisher.stage(flat, direction=not full_gradient)
        direction = fisher.staged_ihvp(staged, flat) if full_gradient else staged.direction
        return staged, self._distributor.full_direction(direction)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one step; returns the closure's loss (or None).

        The step is computed in full before anything is written: if the gradient cannot enter the
        window, or the update would make a parameter non-finite, nothing changes (see ``nonfinite``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            check_group(group)
        self._check_frozen()
        fisher = self._ensure_window()
        try:
            staged, direction = self._direction(fisher)
        except NonFiniteGradientError as error:  # the window refused it and is unchanged
            self._skip(str(error).split(";")[0])
            return loss
        use_momentum = any(group["momentum"] for group in self.param_groups)
        buffer = self._momentum
        if use_momentum:
            buffer = torch.zeros_like(direction) if buffer is None else buffer.clone()
        writes, finite, offset = [], torch.ones((), dtype=torch.bool, device=direction.device), 0
        for group, group_params in self._window_groups():
            params, views, buffers = [], [], []
            for p in group_params:
                local = self._local(p)
                start, offset = offset, offset + local.numel()
                if p.grad is not None:
                    params.append(local)
                    views.append(direction[start:offset])
                    buffers.append(buffer[start:offset] if group["momentum"] else None)
            new, group_finite = mfac_update(params, views, buffers, lr=as_number(group["lr"]),
                                            momentum=as_number(group["momentum"]),
                                            weight_decay=as_number(group["weight_decay"]),
                                            decoupled_weight_decay=group["decoupled_weight_decay"])
            writes.extend(zip(params, new))
            finite &= group_finite
        if not bool(self._distributor.agree(finite)):
            self._skip("the update would make a parameter NaN or Inf (lr too large for this preconditioned "
                       "direction?)")
            return loss
        fisher.commit(staged)
        if use_momentum:
            self._momentum = buffer
        for p, new in writes:
            p.copy_(new)
        self._steps += 1
        return loss

    # Checkpointing -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """torch's optimizer state dict plus an ``"mfac"`` entry holding the window (rows, float64
        Gram matrix, position), the flat momentum buffer and the step counters. Everything in it is
        a tensor, number, string or None, so ``torch.load(..., weights_only=True)`` reads it."""
        state = super().state_dict()
        state["mfac"] = {
            "dim": self.dim,
            "steps": self._steps,
            "skipped_steps": self._skipped,
            "window": None if self._fisher is None else self._fisher.state_dict(),
            "momentum": None if self._momentum is None else self._momentum.clone(),
            "shard": self._distributor.describe(),
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state from ``state_dict``; continuing then gives bitwise the same parameters as
        never having stopped. The window and the float64 state keep their saved dtypes.

        Everything is checked before anything changes (keys, sizes, dtypes, ranges, and that the
        optimizer was built with the same window, damp and window dtype; the window's own state
        once, by the window); a failed load raises ValueError naming the entry and leaves the
        optimizer bitwise unchanged. Under a process group every process loads at once, and a check
        that fails on one process fails on all of them, with its message, before any collective."""
        error, extra = None, None
        try:
            state_dict, extra = check_saved_state(self, state_dict)
        except ValueError as caught:
            error = caught
        has_window = int(extra is not None and extra["window"] is not None)
        self._distributor.fail_together(error, self.device, same={"whether a window was saved": has_window})
        fresh = None
        if extra["window"] is not None:
            fresh = self._new_window(self.device)
            fresh.load_state_dict(extra["window"])
        saved_groups, saved_contents = self.param_groups, [dict(group) for group in self.param_groups]
        saved_state = self.state
        try:
            super().load_state_dict(state_dict)
            for group in self.param_groups:
                for key in _GLOBAL_KEYS:
                    if key in group:
                        raise ValueError(f"the state dict's param groups set {key!r}, which is optimizer-wide")
                check_group(group)
        except (ValueError, KeyError, TypeError, IndexError) as error:
            for group, saved in zip(saved_groups, saved_contents):
                group.clear()
                group.update(saved)
            self.param_groups, self.state = saved_groups, saved_state
            if isinstance(error, ValueError):
                raise
            raise ValueError(f"the state dict's param groups or state are malformed ({error!r}); pass the output "
                             f"of MFAC.state_dict()") from None
        momentum = extra["momentum"]
        self._fisher = fresh
        self._flat_grad = None if fresh is None else torch.zeros(self.dim, dtype=fresh.dtype, device=fresh.device)
        self._momentum = None if momentum is None else momentum.to(self.device).clone()
        self._steps = extra["steps"]
        self._skipped = extra["skipped_steps"]
