"""Gradient collection: turning a model, a loss and batches of data into the rows of G.

* :func:`prunable_parameters`: the default parameters to prune (weights of Linear and Conv layers).
* :func:`collect_gradients`: an (m, d) matrix of mini-batch gradients (one row per batch) or
  per-sample gradients (one row per sample, via ``torch.func``) of chosen parameters, flattened
  in their order, optionally multiplied by masks, with the model in eval mode.
* :func:`cycle`: iterate over any re-iterable data source forever.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from . import resources

__all__ = ["prunable_parameters", "collect_gradients", "cycle"]

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> weight of every Linear and Conv layer, in module order (biases and norms excluded)."""
    return {f"{name}.weight" if name else "weight": module.weight
            for name, module in model.named_modules() if isinstance(module, _PRUNABLE)}


def cycle(data: Iterable) -> Iterator:
    """Yield the items of ``data`` again and again (a DataLoader reshuffles each pass); raises
    ValueError if ``data`` is empty."""
    while True:
        empty = True
        for item in data:
            empty = False
            yield item
        if empty:
            raise ValueError("data yielded no batches; pass a non-empty iterable of (inputs, targets)")


def collect_gradients(model: nn.Module, params: Mapping[str, torch.Tensor], batches: Iterator, loss_fn,
                      num_grads: int, per_sample: bool = False,
                      masks: Mapping[str, torch.Tensor] | None = None, on_rows=None) -> torch.Tensor:
    """Rows of G for the named ``params`` of ``model``: shape (num_grads, d), d = total numel,
    in the parameters' dtype and device.

    Args:
        batches: an iterator of (inputs, targets); consumed as needed.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar mean loss.
        num_grads: rows to collect. Mini-batch mode uses one batch per row; per-sample mode uses
            every sample of each batch as a row (the last batch is cut to fit).
        masks: optional name -> bool tensor; gradients are zeroed where the mask is False.
        on_rows: optional ``on_rows(n)`` called after each batch with the rows it added (progress).

    The model is put in eval mode (so BatchNorm uses its running statistics and dropout is off)
    and restored afterwards. Cost: num_grads forward/backward passes (mini-batch) or
    num_grads / batch_size vmapped passes (per-sample).
    """
    names = list(params)
    first = params[names[0]]
    dim = sum(params[n].numel() for n in names)
    resources.check_fits(num_grads * dim * first.element_size(), first.device,
                         f"a gradient matrix of {num_grads} rows of {dim:,} coordinates",
                         "lower num_grads or prune fewer parameters at once")
    out = torch.empty(num_grads, dim, dtype=first.dtype, device=first.device)
    flat_mask = None
    if masks is not None:
        flat_mask = torch.cat([masks[n].reshape(-1) for n in names]).to(first.dtype)
    was_training = model.training
    model.eval()
    try:
        row = 0
        while row < num_grads:
            inputs, targets = next(batches)
            inputs, targets = inputs.to(first.device), targets.to(first.device)
            if per_sample:
                rows = _per_sample(model, names, params, inputs, targets, loss_fn)[: num_grads - row]
            else:
                with torch.enable_grad():
                    loss = loss_fn(model(inputs), targets)
                    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
                rows = torch.cat([(torch.zeros_like(params[n]) if g is None else g).reshape(-1)
                                  for n, g in zip(names, grads)])[None]
            out[row: row + len(rows)] = rows
            row += len(rows)
            if on_rows is not None:
                on_rows(len(rows))
    finally:
        model.train(was_training)
    if flat_mask is not None:
        out.mul_(flat_mask)
    return out


def _per_sample(model, names, params, inputs, targets, loss_fn) -> torch.Tensor:
    fixed = {k: v.detach() for k, v in model.named_parameters() if k not in params}
    fixed.update(dict(model.named_buffers()))

    def loss_one(chosen, x, y):
        return loss_fn(functional_call(model, {**fixed, **chosen}, (x[None],)), y[None])

    chosen = {n: params[n].detach() for n in names}
    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(chosen, inputs, targets)
    return torch.cat([grads[n].reshape(len(inputs), -1) for n in names], dim=1)
