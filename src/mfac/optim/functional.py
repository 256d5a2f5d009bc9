"""The arithmetic of one MFAC step, as plain functions over lists of tensors (as ``torch.optim.adamw``'s
``adamw()``): :class:`mfac.MFAC` gathers the lists, asks its window for the direction, and calls these.

One step, as published (Frantar et al., 2021), with optional clipping of the gradient first:

    c   <- min(1, max_grad_norm / ||grad||) (global norm over all params; 1 without max_grad_norm)
    g   <- c * grad + weight_decay * p      (coupled weight decay, per group; all params, one vector)
    u   <- F^-1 g                           (F over the last ``window`` gradients, g included)
    buf <- momentum * buf + u               (per group)
    p   <- p - lr * buf                     (decoupled: p * (1 - lr * weight_decay) - lr * buf)
"""

from __future__ import annotations

import math
import numbers

import torch

from ..fisher.base import finite_flag

__all__ = ["as_number", "check_hyper", "check_group", "clip_coefficient", "flatten_gradients", "mfac_update"]


def as_number(value):
    """A real number given as a numpy scalar or a one-element real tensor, as a Python float; any
    other value unchanged (so that :func:`check_hyper` refuses it by its own type)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype.is_floating_point:
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
        return float(value)
    return value


def check_hyper(name: str, value, low: float = 0.0, high: float = math.inf, high_open: bool = False) -> None:
    """Refuse a hyperparameter that is not a finite real number in [low, high] (or [low, high)):
    Python, numpy and one-element tensor numbers are accepted."""
    value = as_number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or value > high or (high_open and value == high):
        bound = f"[{low:g}, {high:g}{')' if high_open else ']'}" if high < math.inf else f">= {low:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def check_group(group: dict) -> None:
    """Settings that cannot work are refused before a step changes anything (schedulers and users
    may edit param groups between steps, so this runs at every step too)."""
    largest = min((torch.finfo(p.dtype).max for p in group["params"]), default=torch.finfo(torch.float32).max)
    check_hyper("lr", group["lr"], 0.0, largest)
    check_hyper("momentum", group["momentum"], 0.0, 1.0, high_open=True)
    check_hyper("weight_decay", group["weight_decay"], 0.0, largest)
    product = as_number(group["lr"]) * as_number(group["weight_decay"])
    if group["decoupled_weight_decay"] and product > 1:
        raise ValueError(f"lr * weight_decay = {product:g} > 1 with decoupled weight decay "
                         f"would flip the sign of the parameters; lower lr or weight_decay")


def clip_coefficient(grads: list[torch.Tensor | None], max_norm: float | None, total=None) -> float:
    """min(1, max_norm / ||grads||) for the global 2-norm of the gradients, as
    ``torch.nn.utils.clip_grad_norm_`` scales them but without its epsilon, so gradients already
    clipped to ``max_norm`` (by Hugging Face's Trainer, say) are left exactly as they are. 1.0 when
    ``max_norm`` is None or the gradients are zero; NaN or 0 for non-finite gradients (which the
    window then refuses). ``total`` sums a (1,) float64 partial sum of squares over the processes
    that share the parameters (None: this process holds them all). One read of the gradients."""
    if max_norm is None:
        return 1.0
    present = [g for g in grads if g is not None]
    squares = torch.zeros(1, dtype=torch.float64, device=present[0].device if present else None)
    for grad in present:
        squares += torch.linalg.vector_norm(grad, dtype=torch.float64).square()
    norm = math.sqrt(float(squares[0] if total is None else total(squares)[0]))
    return 1.0 if norm <= max_norm else max_norm / norm


def flatten_gradients(flat: torch.Tensor, params: list[torch.Tensor], grads: list[torch.Tensor | None],
                      coupled_decay: list[float], scale: float = 1.0) -> torch.Tensor:
    """Write every gradient times ``scale`` (plus its coupled weight decay * p) into ``flat``, in
    order, and zeros for parameters without one: one pass over d. Returns ``flat``."""
    offset = 0
    for p, grad, decay in zip(params, grads, coupled_decay):
        part = flat[offset: offset + p.numel()]
        offset += p.numel()
        if grad is None:
            part.zero_()
        elif grad.is_sparse:
            raise RuntimeError("MFAC does not support sparse gradients")
        else:
            part.copy_(grad.reshape(-1))
            if scale != 1.0:
                part.mul_(scale)
            if decay:
                part.add_(p.reshape(-1), alpha=decay)
    return flat


def mfac_update(params: list[torch.Tensor], directions: list[torch.Tensor],
                momentum_buffers: list[torch.Tensor | None], *, lr: float, momentum: float, weight_decay: float,
                decoupled_weight_decay: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The new values of ``params`` (one group) for their preconditioned directions (flat views),
    without writing them, and a 0-d bool tensor that is True when all are finite (no host sync).
    With ``momentum``, ``momentum_buffers`` (flat views, one per parameter) are updated in place:
    pass copies when the step may still be refused. Cost: O(d) reads and writes."""
    new_values, finite = [], torch.ones((), dtype=torch.bool, device=params[0].device if params else None)
    for p, update, buffer in zip(params, directions, momentum_buffers):
        if momentum:
            update = buffer.mul_(momentum).add_(update)
        base = p * (1.0 - lr * weight_decay) if decoupled_weight_decay and weight_decay else p
        new = torch.add(base, update.view_as(p).to(p.dtype), alpha=-lr)
        finite &= finite_flag(new)
        new_values.append(new)
    return new_values, finite
