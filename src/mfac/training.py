"""Small training and evaluation loops for classifiers, shared by the CLI, benchmarks and tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .data import batches

__all__ = ["train_classifier", "accuracy", "mean_loss"]


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
                     steps: int, batch_size: int = 32, seed: int = 0,
                     on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train with cross-entropy on shuffled mini-batches for ``steps`` steps (seeded order);
    returns the mini-batch losses. ``on_step(step, loss)`` is called after every step."""
    model.train()
    stream = batches(x, y, batch_size, torch.Generator().manual_seed(seed))
    losses = []
    for step in range(steps):
        inputs, targets = next(stream)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of correct top-1 predictions, in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    model.train(was_training)
    return correct / max(len(x), 1)


@torch.no_grad()
def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Mean cross-entropy over the whole set, in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    total = sum(float(nn.functional.cross_entropy(model(x[i:i + batch_size]), y[i:i + batch_size], reduction="sum"))
                for i in range(0, len(x), batch_size))
    model.train(was_training)
    return total / max(len(x), 1)
