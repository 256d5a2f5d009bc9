"""How big and how fast a model is, for the report of ``mfac prune``: parameters, FLOPs per sample,
size on disk and measured latency, each measured the same way before and after pruning.

* Parameters: entries of every parameter tensor (``numel``), and how many of them are non-zero.
* FLOPs per sample: the multiply-adds of every ``nn.Linear`` and ``nn.Conv2d`` for one input
  sample, counted by forward hooks on a real forward pass (one multiply-add counts 1; a Linear
  costs in_features per output entry, a convolution in_channels / groups * kernel area per output
  entry, so token and pixel positions are included). Bias additions, activations, normalization,
  pooling, embeddings and attention's own products (query x key and weights x value) are not
  counted. A weight that is zero but stored densely still counts: unstructured zeros save no FLOPs.
* Size on disk: bytes of the weights file (for a Hugging Face folder, its ``*.safetensors`` files).
* Latency: the median wall time of ``runs`` forward passes of one fixed batch (after
  :data:`WARMUP` untimed passes), in eval mode without autograd, on the CPU threads of the run;
  the dense model (a copy kept from before pruning) and the pruned one are timed in alternation,
  so that both see the same load of the machine.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn

__all__ = ["FLOPS_CONVENTION", "WARMUP", "forward", "parameter_counts", "flops_per_sample", "latency_ms",
           "weights_bytes", "measure", "size_entries", "describe"]

WARMUP = 3
FLOPS_CONVENTION = ("multiply-adds of every Linear and Conv2d layer for one input sample, counted by forward hooks "
                    "(one multiply-add = 1; positions of tokens and pixels included); bias additions, activations, "
                    "normalization, pooling, embeddings and attention's query-key and weight-value products are not "
                    "counted, and zeros stored densely count as any weight")


def forward(model: nn.Module, inputs):
    """The model on ``inputs``: a tensor, or a dict of keyword tensors (Hugging Face batches)."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(entries of all parameters, entries that are not zero); a tensor shared by two modules counts once."""
    params = list(model.parameters())  # parameters() yields each tensor once
    return sum(p.numel() for p in params), sum(int(torch.count_nonzero(p.detach())) for p in params)


def _flops_hook(counter: list):
    def hook(module, args, output):
        if isinstance(module, nn.Linear):
            counter[0] += output.numel() * module.in_features
        else:
            kernel = module.weight.shape[2] * module.weight.shape[3]
            counter[0] += output.numel() * (module.in_channels // module.groups) * kernel
    return hook


@torch.no_grad()
def flops_per_sample(model: nn.Module, sample) -> int:
    """Multiply-adds of the Linear and Conv2d layers for ``sample``, a batch of one input (see the
    module docstring for what counts)."""
    counter = [0]
    handles = [module.register_forward_hook(_flops_hook(counter)) for module in model.modules()
               if isinstance(module, (nn.Linear, nn.Conv2d))]
    was_training = model.training
    model.eval()
    try:
        forward(model, sample)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return counter[0]


@torch.inference_mode()
def latency_ms(models: list[nn.Module], batch, runs: int) -> list[float]:
    """Median milliseconds of a forward pass of ``batch`` through each model: WARMUP untimed passes of
    each, then ``runs`` rounds of one timed pass of each model in turn, so that every model sees the
    same machine load (a dense model and its pruned copy measured in the same run)."""
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        for _ in range(WARMUP):
            for model in models:
                forward(model, batch)
        times = [[] for _ in models]
        for _ in range(runs):
            for model, timed in zip(models, times):
                start = time.perf_counter()
                forward(model, batch)
                timed.append(time.perf_counter() - start)
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)
    return [1000 * statistics.median(timed) for timed in times]


def weights_bytes(path: Path) -> int:
    """Bytes on disk of a weights file, or of the ``*.safetensors`` files of a model folder."""
    path = Path(path)
    if path.is_dir():
        return sum(item.stat().st_size for item in path.glob("*.safetensors"))
    return path.stat().st_size


def measure(model: nn.Module, sample) -> dict:
    """Parameters, non-zero parameters and FLOPs per sample of ``model`` as it is now."""
    total, nonzero = parameter_counts(model)
    return {"parameters": total, "nonzero_parameters": nonzero, "flops_per_sample": flops_per_sample(model, sample)}


def size_entries(before: dict, after: dict, batch_size: int, runs: int, what: str) -> dict:
    """The report entries of two :func:`measure` results (each with ``file_bytes`` and
    ``latency_ms`` added):
    ``NAME_before`` / ``NAME_after`` for each figure, the ratios, and how they were measured."""
    entries = {}
    for key in ("parameters", "nonzero_parameters", "flops_per_sample", "file_bytes", "latency_ms"):
        entries[f"{key}_before"], entries[f"{key}_after"] = before[key], after[key]
    entries["speedup"] = before["latency_ms"] / after["latency_ms"] if after["latency_ms"] > 0 else None
    entries["flops_ratio"] = after["flops_per_sample"] / before["flops_per_sample"] if before["flops_per_sample"] \
        else None
    entries["measurement"] = {
        "after": what, "flops_convention": FLOPS_CONVENTION,
        "file_bytes": "bytes of the weights file (for a folder, its *.safetensors files); before: the dense model "
                      "saved the same way",
        "latency": {"statistic": "median", "batch_size": batch_size, "runs": runs, "warmup_runs": WARMUP,
                    "order": "the dense copy and the pruned model timed in alternation, one pass each per round",
                    "threads": torch.get_num_threads(), "device": "cpu", "mode": "eval, no autograd"}}
    return entries


def describe(before: dict, after: dict, batch_size: int, runs: int) -> str:
    """One printed line: the figures before -> after."""
    def count(n):
        return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)

    def ms(value):
        return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"

    return (f"size: {count(before['parameters'])} -> {count(after['parameters'])} parameters "
            f"({count(after['nonzero_parameters'])} non-zero), {count(before['flops_per_sample'])} -> "
            f"{count(after['flops_per_sample'])} multiply-adds per sample, {before['file_bytes'] / 1e3:,.1f} kB -> "
            f"{after['file_bytes'] / 1e3:,.1f} kB on disk, latency {ms(before['latency_ms'])} -> "
            f"{ms(after['latency_ms'])} ms per batch of {batch_size} (median of {runs}; "
            f"{before['latency_ms'] / max(after['latency_ms'], 1e-12):.2f}x)")
