"""Which vector should a compressed window precondition: the compressed gradient, or the full one?

EFCP (Modoranu et al., 2023) steps along F^-1 c, c the error-fed compressed gradient that just
entered the window; the alternative is F^-1 g with the full gradient g (one more read of the
window per step). This trains the bundled digits MLP (2.4k weights) and digits CNN (38k weights)
with both, on the same batches, for a grid of learning rates and three seeds, window 32 and
density 5% and 1%, momentum 0.9, and prints the final training loss and test accuracy of each at
its best learning rate. ``MFAC(density=...)`` uses the direction this table favours.

    python benchmarks/efcp_direction.py          # about two minutes on 2 cores
"""

from __future__ import annotations

import statistics

import torch

from mfac.data import batches, load_digits
from mfac.fisher import CompressedWindowFisherInverse, NonFiniteGradientError
from mfac.models import mlp, small_cnn
from mfac.training import accuracy, mean_loss

LRS = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
SEEDS = [0, 1, 2]
STEPS = 300


def train(make_model, split, density: float, direction: str, lr: float, seed: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    model = make_model()
    params = list(model.parameters())
    d = sum(p.numel() for p in params)
    window = CompressedWindowFisherInverse(d, 32, 1e-3, density)
    buffer = torch.zeros(d)
    stream = batches(split.train_x, split.train_y, batch_size=32, generator=torch.Generator().manual_seed(seed))
    for _ in range(STEPS):
        x, y = next(stream)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        g = torch.cat([p.grad.reshape(-1) for p in params])
        try:
            if direction == "compressed":
                u = window.push_ihvp(g)
            else:
                window.push(g)
                u = window.ihvp(g)
        except NonFiniteGradientError:  # diverged: this learning rate is too large
            return float("inf"), 0.0
        buffer = 0.9 * buffer + u
        with torch.no_grad():
            offset = 0
            for p in params:
                p.sub_(lr * buffer[offset: offset + p.numel()].view_as(p))
                offset += p.numel()
    loss = mean_loss(model, split.train_x, split.train_y)
    return (loss if loss == loss else float("inf")), accuracy(model, split.test_x, split.test_y)


def main() -> None:
    digits, images = load_digits(), load_digits(images=True)
    tasks = [("digits MLP (2.4k weights)", lambda: mlp(64, (32,)), digits),
             ("digits CNN (38k weights)", small_cnn, images)]
    print(f"# F^-1 of the compressed or of the full gradient: window 32, damp 1e-3, momentum 0.9, {STEPS} steps, "
          f"lr from {LRS} (best mean final loss), seeds {SEEDS}\n")
    print("| task | density | preconditioned | best lr | final train loss | test accuracy % |")
    print("|---|---|---|---|---|---|")
    for task, make_model, split in tasks:
        for density in (0.05, 0.01):
            for direction in ("compressed", "full"):
                results = {lr: [train(make_model, split, density, direction, lr, seed) for seed in SEEDS]
                           for lr in LRS}
                best = min(LRS, key=lambda lr: statistics.mean(r[0] for r in results[lr]))
                losses = [r[0] for r in results[best]]
                accs = [100 * r[1] for r in results[best]]
                print(f"| {task} | {density:g} | {direction} gradient | {best:g} | {statistics.mean(losses):.4f} +- "
                      f"{statistics.stdev(losses):.4f} | {statistics.mean(accs):.1f} +- {statistics.stdev(accs):.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
