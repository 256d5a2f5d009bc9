"""Gradual pruning on the Zhu & Gupta cubic schedule, interleaved with training."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..grads import check_loss, cycle
from .masks import MaskHandle, Masks
from .oneshot import prune_oneshot, resolve_params

__all__ = ["GradualPruner", "check_schedule"]


def check_schedule(final_sparsity, start_step, end_step, every, schedule="cubic", initial_sparsity=0.0) -> None:
    """Validate a pruning schedule's settings; raises ValueError naming the argument."""
    for name, value in (("start_step", start_step), ("end_step", end_step), ("every", every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "every" else 0):
            raise ValueError(f"{name} must be a non-negative int (every >= 1), got {value!r}")
    if end_step < start_step:
        raise ValueError(f"end_step ({end_step}) must not come before start_step ({start_step})")
    for name, value in (("final_sparsity", final_sparsity), ("initial_sparsity", initial_sparsity)):
        if not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if initial_sparsity > final_sparsity:
        raise ValueError("initial_sparsity must not exceed final_sparsity")
    if schedule not in ("cubic", "linear"):
        raise ValueError(f"schedule must be 'cubic' or 'linear', got {schedule!r}")


class GradualPruner:
    """Prune a model step by step while it trains: call ``step()`` once after every
    ``optimizer.step()``.

    At steps start_step, start_step + every, ..., up to end_step, the sparsity target is

        s(t) = final + (initial - final) * (1 - (t - start_step) / (end_step - start_step))^3

    (``schedule="cubic"``; ``"linear"`` uses a first power), and the model is pruned to it with
    :func:`~mfac.prune.prune_oneshot` (``method``, and any of its keyword arguments such as
    ``num_grads``, ``damp``, ``block_size``, ``recompute`` (default 1 here), ``scope``, ``params``).
    Between pruning steps the masks stay attached, so pruned weights are exactly zero throughout.

    Args:
        model: the model being trained (pruned in place).
        final_sparsity: target at ``end_step``, in [0, 1).
        start_step, end_step, every: the pruning steps (counting calls to ``step()`` from 1).
        data, loss_fn: batches and loss for OBS gradients (cycled; not needed for magnitude); or
            ``batch_loss(model, batch)`` instead of ``loss_fn`` for batches of any structure.
    """

    def __init__(self, model: nn.Module, final_sparsity: float, start_step: int, end_step: int, every: int,
                 data: Iterable | None = None, loss_fn=None, method: str = "obs", schedule: str = "cubic",
                 initial_sparsity: float = 0.0, *, batch_loss=None, **prune_kwargs):
        check_schedule(final_sparsity, start_step, end_step, every, schedule, initial_sparsity)
        if method == "obs":
            if data is None:
                raise ValueError("method='obs' needs data and loss_fn or batch_loss; use method='magnitude' to prune "
                                 "without data")
            check_loss(loss_fn, batch_loss)
        prune_kwargs.setdefault("recompute", 1)
        self.model = model
        self.final_sparsity, self.initial_sparsity = float(final_sparsity), float(initial_sparsity)
        self.start_step, self.end_step, self.every = start_step, end_step, every
        self.schedule, self.method, self.loss_fn, self.batch_loss = schedule, method, loss_fn, batch_loss
        self._data = data
        self._prune_kwargs = prune_kwargs
        self._batches = None
        self._names = list(resolve_params(model, prune_kwargs.get("params")))
        self.masks = Masks.dense({n: p for n, p in resolve_params(model, self._names).items()})
        self._handle: MaskHandle | None = None
        self._step = 0

    @property
    def current_step(self) -> int:
        return self._step

    @property
    def sparsity(self) -> float:
        """Sparsity of the pruned tensors now."""
        return self.masks.sparsity()

    def target_sparsity(self, step: int) -> float:
        """The schedule's sparsity for ``step`` (0 before start_step, final after end_step)."""
        if step < self.start_step:
            return 0.0
        if step >= self.end_step:
            return self.final_sparsity
        progress = (step - self.start_step) / (self.end_step - self.start_step)
        power = 3 if self.schedule == "cubic" else 1
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1 - progress) ** power

    def _is_pruning_step(self, step: int) -> bool:
        return self.start_step <= step <= self.end_step and (
            (step - self.start_step) % self.every == 0 or step == self.end_step)

    def step(self) -> bool:
        """Advance one training step; prune if the schedule says so. Returns True if it pruned."""
        self._step += 1
        if not self._is_pruning_step(self._step):
            return False
        target = self.target_sparsity(self._step)
        if target <= self.masks.sparsity() + 1e-12:
            return False
        if self.method == "obs" and self._batches is None:
            self._batches = cycle(self._data)
        self.detach()
        data = _Once(self._batches) if self.method == "obs" else None
        try:
            self.masks = prune_oneshot(self.model, target, data, self.loss_fn, method=self.method,
                                       masks=self.masks, batch_loss=self.batch_loss,
                                       **{**self._prune_kwargs, "params": self._names})
        finally:
            self._handle = self.masks.attach(self.model)
        return True

    def detach(self) -> None:
        """Remove the masks from the model (pruned weights stay zero); ``step()`` re-attaches them."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _schedule(self) -> dict:
        return {"final_sparsity": self.final_sparsity, "initial_sparsity": self.initial_sparsity,
                "start_step": self.start_step, "end_step": self.end_step, "every": self.every,
                "schedule": self.schedule}

    def state_dict(self) -> dict:
        """The schedule position, the masks and the schedule's settings (checked on load)."""
        return {"step": self._step, "masks": self.masks.state_dict(), "schedule": self._schedule()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the step counter and masks, and attach the masks to the model. Checked first
        (keys, step, mask names and shapes against the pruned parameters, the schedule's settings);
        a failed load raises ValueError and changes nothing."""
        if not isinstance(state, dict) or not {"step", "masks"} <= set(state):
            raise ValueError("pruner state must be a dict with 'step' and 'masks'; pass the output of state_dict()")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"pruner state's step must be an int >= 0, got {step!r}")
        saved_schedule = state.get("schedule")
        if saved_schedule is not None and saved_schedule != self._schedule():
            differences = {k: (v, self._schedule().get(k)) for k, v in saved_schedule.items()
                           if self._schedule().get(k) != v}
            raise ValueError(f"pruner state was saved with another schedule (saved, this pruner): {differences}; "
                             f"construct the GradualPruner with the same settings to resume")
        masks = Masks.dense(resolve_params(self.model, self._names))
        try:
            masks.load_state_dict(state["masks"])
        except TypeError as error:
            raise ValueError(f"pruner state's masks: {error}") from None
        self.detach()
        self.masks = masks
        self._step = step
        if self.masks.sparsity() > 0:
            self._handle = self.masks.attach(self.model)


class _Once:
    """Wraps a shared endless iterator so prune_oneshot's cycle() continues it instead of restarting."""

    def __init__(self, iterator):
        self._iterator = iterator

    def __iter__(self):
        return self._iterator
