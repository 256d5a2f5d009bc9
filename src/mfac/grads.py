"""Gradient collection: turning a model, a loss and batches of data into the rows of G.

* :func:`prunable_parameters`: the default parameters to prune (weights of Linear and Conv layers).
* :func:`gradient_chunks`: mini-batch gradients (one row per batch) or per-sample gradients (one
  row per sample) of chosen parameters, flattened in their order, optionally multiplied by masks,
  with the model in eval mode, yielded as (n, d) chunks so a consumer can stream them.
* :func:`collect_gradients`: the same rows gathered into one (m, d) matrix.
* :func:`cycle`: iterate over any re-iterable data source forever.

Two ways to say what the loss is, for any kind of batch:

* ``loss_fn(outputs, targets)`` with ``(inputs, targets)`` batches: the loss of ``model(inputs)``;
* ``batch_loss(model, batch)`` with batches of any structure of tensors (a Hugging Face dict such
  as ``{"input_ids": ..., "attention_mask": ..., "labels": ...}``, a tuple, ...): returns the mean
  loss of the batch, e.g. ``batch_loss=lambda model, batch: model(**batch).loss``.

Batches are moved to the parameters' device. Per-sample gradients with ``batch_loss`` call it on
one-sample batches (every tensor cut to its own row, padding and attention masks included), so each
row is the gradient of that sample's own loss: through ``torch.func.vmap`` where the model allows
it, and by a loop of single-sample backward passes where the model inspects tensor values in
Python (as Hugging Face's attention-mask code does), with a one-time warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_map

from . import resources

__all__ = ["prunable_parameters", "collect_gradients", "gradient_chunks", "cycle", "check_loss"]

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_VMAP_CHUNK_BYTES = 1 << 29  # per-sample gradients materialised at once by vmap: 512 MB


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
            raise ValueError("data yielded no batches; pass a non-empty iterable of batches")


def check_loss(loss_fn, batch_loss) -> None:
    """Exactly one of ``loss_fn(outputs, targets)`` and ``batch_loss(model, batch)`` must be given."""
    if (loss_fn is None) == (batch_loss is None):
        raise ValueError("pass exactly one of loss_fn (called as loss_fn(model(inputs), targets) on (inputs, targets) "
                         "batches) and batch_loss (called as batch_loss(model, batch) on batches of any structure)")
    for name, value in (("loss_fn", loss_fn), ("batch_loss", batch_loss)):
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be callable, got {type(value).__name__}")


def _to_device(batch, device):
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)


def _batch_size(batch) -> int:
    sizes = {t.shape[0] for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"per-sample gradients need every tensor in a batch to have the same first dimension (the "
                         f"samples); got first dimensions {sorted(sizes)}")
    return sizes.pop()


class _FunctionalModel:
    """Calls ``model`` with substituted parameters (torch.func.functional_call), and otherwise looks
    like the model (attributes such as ``config`` pass through), so ``batch_loss`` can use it."""

    def __init__(self, model: nn.Module, weights: dict):
        self._model, self._weights = model, weights

    def __call__(self, *args, **kwargs):
        return functional_call(self._model, self._weights, args, kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def gradient_chunks(model: nn.Module, params: Mapping[str, torch.Tensor], batches: Iterator, num_grads: int,
                    loss_fn: Callable | None = None, batch_loss: Callable | None = None, per_sample: bool = False,
                    masks: Mapping[str, torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
    """Yield gradient rows for the named ``params`` in chunks of shape (n, d), num_grads rows in all,
    in the parameters' dtype and device. Mini-batch mode yields one row per batch; per-sample mode
    one row per sample of each batch (the last batch is cut to fit).

    The model is put in eval mode (BatchNorm uses its running statistics, dropout is off) while
    rows are computed, and its mode is restored before each chunk is yielded. Memory: one chunk
    (a batch of rows; vmap materialises at most 512 MB of per-sample gradients at once).
    """
    check_loss(loss_fn, batch_loss)
    names = list(params)
    first = params[names[0]]
    dim = sum(params[n].numel() for n in names)
    flat_mask = None
    if masks is not None:
        flat_mask = torch.cat([masks[n].reshape(-1) for n in names]).to(first.dtype)
    state = {"vmap": True}
    row = 0
    while row < num_grads:
        batch = _to_device(next(batches), first.device)
        was_training = model.training
        model.eval()
        try:
            if per_sample:
                rows = _per_sample(model, names, params, batch, loss_fn, batch_loss, num_grads - row, state)
            else:
                if batch_loss is not None:
                    loss_of = batch_loss
                else:
                    def loss_of(net, pair):
                        return loss_fn(net(pair[0]), pair[1])
                rows = torch.empty(1, dim, dtype=first.dtype, device=first.device)
                _gradient_row(model, names, params, loss_of, batch, rows[0])
        finally:
            model.train(was_training)
        rows = rows[: num_grads - row]
        if flat_mask is not None:
            rows.mul_(flat_mask)  # rows are freshly computed and ours: no second copy of the chunk
        row += len(rows)
        yield rows
        del rows  # the consumer is done with it: do not hold it while computing the next chunk


def collect_gradients(model: nn.Module, params: Mapping[str, torch.Tensor], batches: Iterator, loss_fn=None,
                      num_grads: int = 1, per_sample: bool = False,
                      masks: Mapping[str, torch.Tensor] | None = None, on_rows=None, *,
                      batch_loss: Callable | None = None) -> torch.Tensor:
    """Rows of G for the named ``params`` of ``model``: shape (num_grads, d), d = total numel,
    in the parameters' dtype and device (see :func:`gradient_chunks` for the arguments).

    Args:
        batches: an iterator of batches; consumed as needed.
        loss_fn / batch_loss: how the loss is computed (exactly one; see the module docstring).
        num_grads: rows to collect.
        masks: optional name -> bool tensor; gradients are zeroed where the mask is False.
        on_rows: optional ``on_rows(n)`` called after each batch with the rows it added (progress).

    Memory: num_grads * d numbers, checked against the memory available before anything runs.
    Cost: num_grads forward/backward passes (mini-batch) or about num_grads / batch_size batched
    passes (per-sample).
    """
    names = list(params)
    first = params[names[0]]
    dim = sum(params[n].numel() for n in names)
    resources.check_fits(num_grads * dim * first.element_size(), first.device,
                         f"a gradient matrix of {num_grads} rows of {dim:,} coordinates",
                         "lower num_grads or prune fewer parameters at once")
    out = torch.empty(num_grads, dim, dtype=first.dtype, device=first.device)
    row = 0
    for rows in gradient_chunks(model, params, batches, num_grads, loss_fn, batch_loss, per_sample, masks):
        out[row: row + len(rows)] = rows
        row += len(rows)
        if on_rows is not None:
            on_rows(len(rows))
    return out


def _per_sample(model, names, params, batch, loss_fn, batch_loss, limit, state) -> torch.Tensor:
    """(n, d) per-sample gradients of one batch (n <= limit)."""
    fixed = {k: v.detach() for k, v in model.named_parameters() if k not in params}
    fixed.update(dict(model.named_buffers()))
    chosen = {n: params[n].detach() for n in names}
    dim = sum(p.numel() for p in chosen.values())
    if batch_loss is None:
        inputs, targets = batch
        inputs, targets = inputs[:limit], targets[:limit]

        def loss_one(weights, x, y):
            return loss_fn(functional_call(model, {**fixed, **weights}, (x[None],)), y[None])

        grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(chosen, inputs, targets)
        return torch.cat([grads[n].reshape(len(inputs), -1) for n in names], dim=1)

    n = min(_batch_size(batch), limit)
    batch = tree_map(lambda t: t[:n] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, batch)
    if state["vmap"]:
        try:
            return _per_sample_vmap(model, names, fixed, chosen, batch, batch_loss, n, dim)
        except RuntimeError as error:
            if "vmap" not in str(error):
                raise
            state["vmap"] = False
            warnings.warn("per-sample gradients: torch.func.vmap cannot run this model (it inspects tensor values "
                          f"in Python: {str(error).splitlines()[0][:120]}...); using a loop of single-sample backward "
                          "passes instead, which gives the same rows more slowly", RuntimeWarning, stacklevel=4)
    first = chosen[names[0]]
    rows = torch.empty(n, dim, dtype=first.dtype, device=first.device)
    for i in range(n):
        sample = tree_map(lambda t: t[i:i + 1] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, batch)
        _gradient_row(model, names, params, batch_loss, sample, rows[i])
    return rows


def _gradient_row(model, names, params, loss_of, batch, out: torch.Tensor) -> None:
    """Write the flattened gradient of ``loss_of(model, batch)`` with respect to the named params
    into ``out`` (d,), zeros for parameters the loss does not use."""
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_of(model, batch), [params[name] for name in names], allow_unused=True)
    offset = 0
    for name, g in zip(names, grads):
        size = params[name].numel()
        if g is None:
            out[offset: offset + size] = 0
        else:
            out[offset: offset + size] = g.reshape(-1)
        offset += size


def _per_sample_vmap(model, names, fixed, chosen, batch, batch_loss, n, dim) -> torch.Tensor:
    in_dims = tree_map(lambda t: 0 if isinstance(t, torch.Tensor) and t.dim() > 0 else None, batch)

    def loss_one(weights, sample):
        sample = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, sample)
        return batch_loss(_FunctionalModel(model, {**fixed, **weights}), sample)

    per_chunk = max(1, _VMAP_CHUNK_BYTES // max(1, dim * next(iter(chosen.values())).element_size()))
    grads = vmap(grad(loss_one), in_dims=(None, in_dims), chunk_size=per_chunk)(chosen, batch)
    return torch.cat([grads[name].reshape(n, -1) for name in names], dim=1)
