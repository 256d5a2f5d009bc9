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

The linear algebra lives in :mod:`mfac.fisher`; this module only flattens gradients into one
vector, applies the update and keeps the state.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.optim import Optimizer

from ..distributed import is_dtensor
from ..fisher import CompressedWindowFisherInverse, NonFiniteGradientError, SlidingWindowFisherInverse
from ..fisher.base import all_finite, check_damp, compute_dtype, finite_flag
from ..fisher.compressed import check_density, compressed_nbytes
from ..fisher.window import validate_window_state, window_nbytes
from .. import resources

__all__ = ["MFAC"]

_GLOBAL_KEYS = ("window", "damp", "window_dtype", "nonfinite", "density", "precondition")


def _check_hyper(name: str, value, low: float = 0.0, high: float = math.inf, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or value > high or (high_open and value == high):
        bound = f"[{low:g}, {high:g}{')' if high_open else ']'}" if high < math.inf else f">= {low:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def _unchanged(tensor):
    return tensor


def _check_group(group: dict) -> None:
    """Settings that cannot work are refused before a step changes anything (schedulers and users
    may edit param groups between steps, so this runs at every step too)."""
    largest = min((torch.finfo(p.dtype).max for p in group["params"]), default=torch.finfo(torch.float32).max)
    _check_hyper("lr", group["lr"], 0.0, largest)
    _check_hyper("momentum", group["momentum"], 0.0, 1.0, high_open=True)
    _check_hyper("weight_decay", group["weight_decay"], 0.0, largest)
    if group["decoupled_weight_decay"] and group["lr"] * group["weight_decay"] > 1:
        raise ValueError(f"lr * weight_decay = {group['lr'] * group['weight_decay']:g} > 1 with decoupled weight decay "
                         f"would flip the sign of the parameters; lower lr or weight_decay")


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
            does. The full gradient reached 3-10x lower training loss on the bundled tasks
            (``benchmarks/efcp_direction.py``) for one more read of the kept entries per step.

    All parameters of all groups form one vector of d coordinates and share one window, as in the
    published method; the window is created at the first ``step``, after which ``add_param_group``
    is refused. The constructor refuses settings that cannot work (damp below the smallest normal
    number of the window's dtype, lr beyond the parameters' dtype) and a window that cannot fit in
    the memory available, before any step. Cost per step: two reads of the window plus
    O(d + window^3 / 3); extra memory 3 d numbers (flat gradient, momentum, a staged update).
    """

    def __init__(self, params, lr: float = 1e-3, window: int = 512, damp: float = 1e-5, momentum: float = 0.0,
                 weight_decay: float = 0.0, decoupled_weight_decay: bool = False,
                 window_dtype: torch.dtype | None = None, nonfinite: str = "skip", process_group=None,
                 density: float = 1.0, precondition: str = "gradient"):
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
        if self._density < 1 and process_group is not None:
            raise ValueError("density < 1 (a compressed window) cannot be combined with process_group yet; "
                             "shard a dense window (density=1.0) or compress on one process")
        if self._density < 1 and window_dtype not in (None, torch.float32, torch.bfloat16):
            raise TypeError(f"a compressed window (density < 1) stores float32 or bfloat16 values, got "
                            f"window_dtype={window_dtype!r}")
        self._window_size = window
        self._window_dtype = window_dtype
        self._nonfinite = nonfinite
        self._group = process_group
        self._layout = None  # the coordinates of this process, when the window is sharded over replicas
        self._param_shards = None  # set when the parameters themselves are sharded (FSDP2)
        self._local = _unchanged
        self._fisher: SlidingWindowFisherInverse | None = None
        self._flat_grad: torch.Tensor | None = None
        self._momentum: torch.Tensor | None = None
        self._steps = 0
        self._skipped = 0
        self._warned_nonfinite = False
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)
        sharded_params = any(map(is_dtensor, self._all_params()))
        if self._density < 1 and sharded_params:
            raise ValueError("density < 1 (a compressed window) cannot be combined with FSDP2's sharded parameters "
                             "yet; use density=1.0")
        if sharded_params:
            from ..distributed import ParamShards, local_tensor

            self._param_shards, self._group = ParamShards.of(self._all_params(), process_group)
            self._local = local_tensor
        elif process_group is not None:
            from ..distributed import ShardLayout

            self._layout = ShardLayout.of(self.dim, process_group)
        dtype = self._storage_dtype()
        self._damp = check_damp(damp, compute_dtype(dtype))
        device = self._all_params()[0].device
        vectors = 3 * self.dim * compute_dtype(dtype).itemsize  # flat gradient, momentum, staged update
        if self._density < 1:
            if self.dim <= window:
                raise ValueError(f"density < 1 needs more coordinates than the window holds gradients, got d = "
                                 f"{self.dim} and window = {window}; use density=1.0 (the dense window costs no "
                                 f"more for a model this small)")
            state = compressed_nbytes(self.dim, window, self._density, dtype)
        else:
            state = window_nbytes(self._window_dim, window, dtype)
        resources.check_fits(state + vectors, device,
                             f"MFAC's state (a window of {window} gradients of {self.dim:,} coordinates in {dtype}"
                             f"{f' at density {self._density:g}' if self._density < 1 else ''}, plus 3 vectors of d)",
                             "lower window, or use window_dtype=torch.bfloat16, or density < 1")

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
        for p in group["params"]:
            if not p.dtype.is_floating_point:
                raise TypeError(f"MFAC needs floating parameters, got one of dtype {p.dtype}")
        try:
            _check_group(group)
        except ValueError:
            self.param_groups.pop()
            raise

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def dim(self) -> int:
        """d: the number of coordinates of all parameters together (of this process's shards, under FSDP2)."""
        return sum(self._local(p).numel() for p in self._all_params())

    @property
    def _window_dim(self) -> int:
        """Coordinates of the window held here: d, or this process's shard of it."""
        return self.dim if self._layout is None else self._layout.size

    def _reduce_hook(self):
        if self._group is None:
            return None
        from ..distributed import sum_over

        return sum_over(self._group)

    def _new_window(self, device) -> SlidingWindowFisherInverse:
        if self._density < 1:
            return CompressedWindowFisherInverse(self.dim, self._window_size, self._damp, self._density,
                                                 dtype=self._storage_dtype(), device=device)
        return SlidingWindowFisherInverse(self._window_dim, self._window_size, self._damp,
                                          dtype=self._storage_dtype(), device=device, reduce=self._reduce_hook())

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

    def _storage_dtype(self) -> torch.dtype:
        if self._window_dtype is not None:
            return self._window_dtype
        dtypes = {compute_dtype(p.dtype) for p in self._all_params()}
        return torch.float64 if torch.float64 in dtypes and self._density == 1 else torch.float32

    def _ensure_window(self) -> SlidingWindowFisherInverse:
        if self._fisher is None:
            params = self._all_params()
            if not params:
                raise ValueError("MFAC has no parameters to optimize")
            sharded = [is_dtensor(p) for p in params]
            if any(sharded) and (self._param_shards is None or not all(sharded)):
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

    def _gather_gradient(self) -> torch.Tensor:
        """Write every group's grad (+ coupled weight decay) into the flat vector: one pass over d."""
        flat, offset = self._flat_grad, 0
        for group in self.param_groups:
            coupled_decay = 0.0 if group["decoupled_weight_decay"] else group["weight_decay"]
            for p in group["params"]:
                grad, p = self._local(p.grad), self._local(p)
                part = flat[offset: offset + p.numel()]
                offset += p.numel()
                if grad is None:
                    part.zero_()
                elif grad.is_sparse:
                    raise RuntimeError("MFAC does not support sparse gradients")
                elif coupled_decay:
                    torch.add(grad.reshape(-1), p.reshape(-1), alpha=coupled_decay, out=part)
                else:
                    part.copy_(grad.reshape(-1))
        return flat

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

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one step; returns the closure's loss (or None).

        The step is computed in full before anything is written: if the gradient cannot enter the
        window, or the update would make a parameter non-finite, nothing changes (see ``nonfinite``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _check_group(group)
        fisher = self._ensure_window()
        flat = self._gather_gradient()
        if self._layout is not None:
            flat = flat[self._layout.start: self._layout.stop]
        full_gradient = self._density < 1 and self._precondition == "gradient"
        try:
            staged = fisher._stage(flat, want_direction=not full_gradient)
            direction = fisher._staged_ihvp(staged, flat) if full_gradient else staged.direction
        except NonFiniteGradientError as error:  # the window refused it and is unchanged
            self._skip(str(error).split(";")[0])
            return loss
        if self._layout is not None:
            from ..distributed import gather_over

            direction = gather_over(direction, self._layout, self._group)
        use_momentum = any(group["momentum"] for group in self.param_groups)
        momentum_buffer = self._momentum
        if use_momentum:
            momentum_buffer = torch.zeros_like(direction) if momentum_buffer is None else momentum_buffer.clone()
        updates, finite, offset = [], torch.ones((), dtype=torch.bool, device=direction.device), 0
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    offset += self._local(p).numel()
                    continue
                p = self._local(p)
                start, offset = offset, offset + p.numel()
                update = direction[start:offset]
                if momentum:
                    update = momentum_buffer[start:offset].mul_(momentum).add_(update)
                base = p * (1.0 - lr * decay) if group["decoupled_weight_decay"] and decay else p
                new = torch.add(base, update.view_as(p).to(p.dtype), alpha=-lr)
                finite &= finite_flag(new)
                updates.append((p, new))
        if self._param_shards is not None:  # each process sees its own shards: all must agree to step
            from ..distributed import all_true

            finite = all_true(finite, self._group)
        if not bool(finite):
            self._skip("the update would make a parameter NaN or Inf (lr too large for this preconditioned "
                       "direction?)")
            return loss
        fisher._commit(staged)
        if use_momentum:
            self._momentum = momentum_buffer
        for p, new in updates:
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
            "shard": self._shard_description(),
        }
        return state

    def _shard_description(self) -> dict | None:
        """Which part of the coordinates this process's state covers: None for all of them."""
        for shards in (self._layout, self._param_shards):
            if shards is not None:
                return shards.as_dict()
        return None

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state from ``state_dict``; continuing then gives bitwise the same parameters as
        never having stopped. The window and the float64 state keep their saved dtypes.

        Everything is checked before anything changes (keys, sizes, dtypes, ranges, and that the
        optimizer was built with the same window, damp and window dtype); a failed load raises
        ValueError naming the entry and leaves the optimizer bitwise unchanged."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("mfac"), dict):
            raise ValueError("this state dict has no 'mfac' entry: it was not saved by MFAC.state_dict()")
        state_dict = dict(state_dict)
        extra = state_dict.pop("mfac")
        missing = {"dim", "steps", "skipped_steps", "window", "momentum"} - set(extra)
        if missing:
            raise ValueError(f"the state dict's 'mfac' entry is missing {sorted(missing)}; pass the output of "
                             f"MFAC.state_dict()")
        if extra["dim"] != self.dim or isinstance(extra["dim"], bool):
            raise ValueError(f"the state dict is for parameters with d = {extra['dim']!r} coordinates, but this "
                             f"optimizer's parameters have d = {self.dim:,}; load it into an MFAC built on the "
                             f"same model")
        saved_shard = extra.get("shard")
        mine = self._shard_description()
        if saved_shard != mine:
            def describe(shard):
                return ("one process (no process_group)" if shard is None else
                        f"process {shard.get('rank')} of {shard.get('world_size')}")
            raise ValueError(f"the state dict was saved by {describe(saved_shard)}, but this optimizer runs as "
                             f"{describe(mine)}; each process loads the state it saved, with the same number of "
                             f"processes")
        for key in ("steps", "skipped_steps"):
            if isinstance(extra[key], bool) or not isinstance(extra[key], int) or extra[key] < 0:
                raise ValueError(f"the state dict's mfac.{key} must be an int >= 0, got {extra[key]!r}")
        window_state = extra["window"]
        dtype = self._storage_dtype()
        if window_state is not None:
            if isinstance(window_state, dict) and window_state.get("window") != self._window_size:
                raise ValueError(f"the state dict has window = {window_state.get('window')!r} but this optimizer "
                                 f"has window = {self._window_size}; construct MFAC with the same window")
            if isinstance(window_state, dict) and window_state.get("damp") != self._damp:
                raise ValueError(f"the state dict has damp = {window_state.get('damp')!r} but this optimizer has "
                                 f"damp = {self._damp:g}; construct MFAC with the same damp to resume")
            if isinstance(window_state, dict) and window_state.get("storage_dtype") != str(dtype):
                raise ValueError(f"the state dict's window stores {window_state.get('storage_dtype')!r} but this "
                                 f"optimizer's window stores {dtype}; construct MFAC with the same window_dtype")
            if isinstance(window_state, dict) and window_state.get("density", 1.0) != self._density:
                raise ValueError(f"the state dict's window has density = {window_state.get('density', 1.0)!r} but "
                                 f"this optimizer has density = {self._density:g}; construct MFAC with the same "
                                 f"density")
            if self._density == 1:  # a compressed window checks its whole state in load_state_dict below
                validate_window_state(window_state, self._window_dim, self._window_size, self._damp, dtype,
                                      self._reduce_hook())
        elif extra["steps"] > 0:
            raise ValueError(f"the state dict records {extra['steps']} steps but no window; it is not from "
                             f"MFAC.state_dict()")
        momentum = extra["momentum"]
        if momentum is not None:
            expected = compute_dtype(dtype)
            if not isinstance(momentum, torch.Tensor) or momentum.shape != (self.dim,) or momentum.dtype != expected:
                got = (f"{tuple(momentum.shape)} {momentum.dtype}" if isinstance(momentum, torch.Tensor)
                       else type(momentum).__name__)
                raise ValueError(f"the state dict's momentum must be a ({self.dim},) {expected} tensor, got {got}")
            if not all_finite(momentum):
                raise ValueError("the state dict's momentum contains NaN or Inf")
        device = self._all_params()[0].device
        fresh = None
        if window_state is not None:
            fresh = self._new_window(device)
            fresh.load_state_dict(window_state)
        saved_groups, saved_contents = self.param_groups, [dict(group) for group in self.param_groups]
        saved_state = self.state
        try:
            super().load_state_dict(state_dict)
            for group in self.param_groups:
                for key in _GLOBAL_KEYS:
                    if key in group:
                        raise ValueError(f"the state dict's param groups set {key!r}, which is optimizer-wide")
                _check_group(group)
        except (ValueError, KeyError, TypeError, IndexError) as error:
            for group, saved in zip(saved_groups, saved_contents):
                group.clear()
                group.update(saved)
            self.param_groups, self.state = saved_groups, saved_state
            if isinstance(error, ValueError):
                raise
            raise ValueError(f"the state dict's param groups or state are malformed ({error!r}); pass the output "
                             f"of MFAC.state_dict()") from None
        self._fisher = fresh
        self._flat_grad = None if fresh is None else torch.zeros(self.dim, dtype=fresh.dtype, device=fresh.device)
        self._momentum = None if momentum is None else momentum.to(device).clone()
        self._steps = extra["steps"]
        self._skipped = extra["skipped_steps"]
