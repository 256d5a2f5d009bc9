"""The M-FAC optimizer: steps preconditioned by a sliding window of recent gradients.

``MFAC`` follows ``torch.optim`` conventions: param groups are read inside ``step`` (so LR
schedulers and per-group settings work), ``step(closure)`` returns the closure's loss, parameters
whose ``.grad`` is None are skipped, and ``state_dict``/``load_state_dict`` resume exactly.

One step, as published (Frantar et al., 2021):

    g   <- grad + weight_decay * p          (coupled weight decay, per group; all params, one vector)
    u   <- F^-1 g                           (F over the last ``window`` gradients, g included)
    buf <- momentum * buf + u               (per group)
    p   <- p - lr * buf

The linear algebra lives in :class:`mfac.fisher.SlidingWindowFisherInverse`; this module only
flattens gradients into one vector, applies the update and keeps the state.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.optim import Optimizer

from ..fisher import NonFiniteGradientError, SlidingWindowFisherInverse
from ..fisher.base import check_damp, compute_dtype

__all__ = ["MFAC"]

_GLOBAL_KEYS = ("window", "damp", "window_dtype", "refactor_every", "nonfinite")


def _check_hyper(name: str, value, low: float = 0.0, high: float = math.inf, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or value > high or (high_open and value == high):
        bound = f"[{low:g}, {high:g}{')' if high_open else ']'}" if high < math.inf else f">= {low:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


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
        nonfinite: "skip" (default): a step whose gradient has NaN/Inf changes nothing (parameters,
            window, momentum), counts in ``skipped_steps`` and warns once; "raise": raise instead.
        refactor_every: passed to the window (optimizer-wide); default: ``window``.

    All parameters of all groups form one vector of d coordinates and share one window, as in the
    published method; the window is created at the first ``step``, after which ``add_param_group``
    is refused. Cost per step: two reads of the window plus O(d + window^2).
    """

    def __init__(self, params, lr: float = 1e-3, window: int = 512, damp: float = 1e-5, momentum: float = 0.0,
                 weight_decay: float = 0.0, decoupled_weight_decay: bool = False,
                 window_dtype: torch.dtype | None = None, nonfinite: str = "skip",
                 refactor_every: int | None = None):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1 (the number of gradients kept), got {window!r}")
        self._damp = check_damp(damp)
        if window_dtype is not None and (not isinstance(window_dtype, torch.dtype)
                                         or not window_dtype.is_floating_point):
            raise TypeError(f"window_dtype must be a floating torch.dtype or None, got {window_dtype!r}")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        self._window_size = window
        self._window_dtype = window_dtype
        self._nonfinite = nonfinite
        self._refactor_every = refactor_every
        self._fisher: SlidingWindowFisherInverse | None = None
        self._flat_grad: torch.Tensor | None = None
        self._momentum: torch.Tensor | None = None
        self._steps = 0
        self._skipped = 0
        self._warned_nonfinite = False
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)

    # Param groups ----------------------------------------------------------------------------------

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
        _check_hyper("lr", group["lr"])
        _check_hyper("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        _check_hyper("weight_decay", group["weight_decay"])
        for p in group["params"]:
            if not p.dtype.is_floating_point:
                raise TypeError(f"MFAC needs floating parameters, got one of dtype {p.dtype}")

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def dim(self) -> int:
        """d: the number of coordinates of all parameters together."""
        return sum(p.numel() for p in self._all_params())

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
        """Steps skipped because the gradient was not finite."""
        return self._skipped

    def _default_window_dtype(self) -> torch.dtype:
        dtypes = {compute_dtype(p.dtype) for p in self._all_params()}
        return torch.float64 if torch.float64 in dtypes else torch.float32

    def _ensure_window(self) -> SlidingWindowFisherInverse:
        if self._fisher is None:
            params = self._all_params()
            if not params:
                raise ValueError("MFAC has no parameters to optimize")
            devices = {p.device for p in params}
            if len(devices) > 1:
                raise ValueError(f"MFAC keeps one window for all parameters, so they must share a device; got "
                                 f"{sorted(map(str, devices))}")
            dtype = self._window_dtype or self._default_window_dtype()
            self._fisher = SlidingWindowFisherInverse(self.dim, self._window_size, self._damp, dtype=dtype,
                                                      device=devices.pop(), refactor_every=self._refactor_every)
            self._flat_grad = torch.zeros(self.dim, dtype=self._fisher.dtype, device=self._fisher.device)
        return self._fisher

    # The step ------------------------------------------------------------------------------------

    def _gather_gradient(self) -> torch.Tensor:
        """Write every group's grad (+ coupled weight decay) into the flat vector: one pass over d."""
        flat, offset = self._flat_grad, 0
        for group in self.param_groups:
            coupled_decay = 0.0 if group["decoupled_weight_decay"] else group["weight_decay"]
            for p in group["params"]:
                part = flat[offset: offset + p.numel()]
                offset += p.numel()
                if p.grad is None:
                    part.zero_()
                elif p.grad.is_sparse:
                    raise RuntimeError("MFAC does not support sparse gradients")
                elif coupled_decay:
                    torch.add(p.grad.reshape(-1), p.reshape(-1), alpha=coupled_decay, out=part)
                else:
                    part.copy_(p.grad.reshape(-1))
        return flat

    def _skip_nonfinite(self) -> None:
        self._skipped += 1
        message = (f"MFAC skipped step {self._steps + self._skipped}: the gradient contains NaN or Inf, so "
                   f"parameters, window and momentum were left unchanged ({self._skipped} skipped so far)")
        if self._nonfinite == "raise":
            raise FloatingPointError(message)
        if not self._warned_nonfinite:
            warnings.warn(message + "; further skips are counted in skipped_steps without a warning",
                          RuntimeWarning, stacklevel=3)
            self._warned_nonfinite = True

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one step; returns the closure's loss (or None)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        fisher = self._ensure_window()
        try:
            direction = fisher.push_ihvp(self._gather_gradient())
        except NonFiniteGradientError:  # the window refused it and is unchanged
            self._skip_nonfinite()
            return loss
        if self._momentum is None and any(group["momentum"] for group in self.param_groups):
            self._momentum = torch.zeros_like(direction)
        offset = 0
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                start, offset = offset, offset + p.numel()
                if p.grad is None:
                    continue
                update = direction[start:offset]
                if momentum:
                    update = self._momentum[start:offset].mul_(momentum).add_(update)
                if group["decoupled_weight_decay"] and decay:
                    p.mul_(1.0 - lr * decay)
                p.add_(update.view_as(p).to(p.dtype), alpha=-lr)
        self._steps += 1
        return loss

    # Checkpointing -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """torch's optimizer state dict plus an ``"mfac"`` entry holding the window (rows, float64
        Gram and inverse, position), the flat momentum buffer and the step counters."""
        state = super().state_dict()
        state["mfac"] = {
            "dim": self.dim,
            "steps": self._steps,
            "skipped_steps": self._skipped,
            "window": None if self._fisher is None else self._fisher.state_dict(),
            "momentum": None if self._momentum is None else self._momentum.clone(),
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state from ``state_dict``; continuing then gives bitwise the same parameters as
        never having stopped. The window and the float64 state keep their saved dtypes."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("mfac", None)
        if extra is None:
            raise ValueError("this state dict has no 'mfac' entry: it was not saved by MFAC.state_dict()")
        if extra["dim"] != self.dim:
            raise ValueError(f"the state dict is for parameters with d = {extra['dim']:,} coordinates, but this "
                             f"optimizer's parameters have d = {self.dim:,}; load it into an MFAC built on the "
                             f"same model")
        window_state = extra["window"]
        if window_state is not None and window_state["damp"] != self._damp:
            raise ValueError(f"the state dict has damp = {window_state['damp']:g} but this optimizer has "
                             f"damp = {self._damp:g}; construct MFAC with the same damp to resume")
        if window_state is not None:
            fresh = SlidingWindowFisherInverse(self.dim, window_state["window"], self._damp,
                                               dtype=getattr(torch, window_state["storage_dtype"].split(".")[-1]),
                                               device=self._all_params()[0].device,
                                               refactor_every=window_state.get("refactor_every"))
            if window_state["window"] != self._window_size:
                raise ValueError(f"the state dict has window = {window_state['window']} but this optimizer has "
                                 f"window = {self._window_size}; construct MFAC with the same window")
            fresh.load_state_dict(window_state)  # validates damp and dtypes before anything changes
        super().load_state_dict(state_dict)
        if window_state is not None:
            self._fisher = fresh
            self._flat_grad = torch.zeros(self.dim, dtype=fresh.dtype, device=fresh.device)
        momentum = extra["momentum"]
        self._momentum = None if momentum is None else momentum.to(self._all_params()[0].device).clone()
        self._steps = int(extra["steps"])
        self._skipped = int(extra["skipped_steps"])
