"""Re-estimating BatchNorm statistics after pruning."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["recalibrate_batchnorm"]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: Iterable, num_batches: int) -> int:
    """Reset every BatchNorm layer's running mean and variance and re-estimate them as the plain
    average over ``num_batches`` batches of ``data`` (inputs, targets), with every other module in
    eval mode. Pruning shifts activations, so the old statistics no longer fit. Modes and momenta
    are restored afterwards. Returns the number of batches used."""
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be an int >= 1, got {num_batches!r}")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    device = next(model.parameters()).device
    used = 0
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch counts equally
            m.train()
        for inputs, _ in data:
            if used == num_batches:
                break
            model(inputs.to(device))
            used += 1
    finally:
        for m, mode in modes.items():
            m.train(mode)
        for m, momentum in momenta.items():
            m.momentum = momentum
    if used == 0:
        raise ValueError("data yielded no batches")
    return used
