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

Batches are moved to the parameters' device. Each per-sample row is the gradient of that
sample's own loss (with ``batch_loss``: the loss of a one-sample batch, every tensor cut to its own
row, padding and attention masks included). The fastest exact route is chosen once per call (see
``_Routes``): for weights and biases of Linear layers (every Linear of a transformer), one batched
forward and backward pass plus a batched matrix product per layer; otherwise ``torch.func.vmap``;
and where vmap cannot run the model, a loop of single-sample backward passes, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_flatten, tree_map

from . import resources

__all__ = ["prunable_parameters", "collect_gradients", "gradient_chunks", "cycle", "check_loss", "to_device",
           "samples_in"]

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


def check_loss(loss_fn: Callable | None, batch_loss: Callable | None) -> None:
    """Exactly one of ``loss_fn(outputs, targets)`` and ``batch_loss(model, batch)`` must be given."""
    if (loss_fn is None) == (batch_loss is None):
        raise ValueError("pass exactly one of loss_fn (called as loss_fn(model(inputs), targets) on (inputs, targets) "
                         "batches) and batch_loss (called as batch_loss(model, batch) on batches of any structure)")
    for name, value in (("loss_fn", loss_fn), ("batch_loss", batch_loss)):
        if isinstance(value, type):  # nn.CrossEntropyLoss rather than nn.CrossEntropyLoss()
            raise TypeError(f"{name}={value.__name__} is a class, not a loss: instantiate it, "
                            f"{name}={value.__name__}()")
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be callable, got {type(value).__name__}")


def _plain(batch):
    """Mappings that are not dicts (Hugging Face's BatchEncoding) become dicts, so torch's tree
    utilities see their tensors."""
    if isinstance(batch, Mapping):
        return {key: _plain(value) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(_plain(value) for value in batch)
    return batch


def to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` (any structure of tensors) with every tensor on ``device``."""
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, _plain(batch))


def samples_in(batch: Any) -> int:
    """The number of samples of ``batch``: the first dimension its tensors share (ValueError if none)."""
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
                    masks: Mapping[str, torch.Tensor] | None = None,
                    chunk_rows: int | None = None, *, reuse_chunks: bool = False) -> Iterator[torch.Tensor]:
    """Yield gradient rows for the named ``params`` in chunks of shape (n, d), num_grads rows in all,
    in the parameters' dtype and device. Mini-batch mode makes one row per batch; per-sample mode
    one row per sample of each batch (the last batch is cut to fit).

    Args:
        chunk_rows: rows per yielded chunk (the last may be shorter); by default each batch's rows
            form one chunk.
        reuse_chunks: fill the same tensor again for every chunk of the same size, for a consumer
            that is done with each chunk before it asks for the next (saves allocating, and the
            operating system zeroing, a chunk of a gigabyte or more per chunk at transformer scale).

    The model is put in eval mode (BatchNorm uses its running statistics, dropout is off) while
    rows are computed, and its mode is restored before each chunk is yielded. Each chunk is a fresh
    tensor the consumer may keep. Memory: one chunk, plus, per-sample, the batch's activations and
    output gradients of the chosen Linear layers, or (other layers) at most 512 MB of per-sample
    gradients materialised at once by vmap.
    """
    check_loss(loss_fn, batch_loss)
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be None or an int >= 1, got {chunk_rows!r}")
    names = list(params)
    first = params[names[0]]
    dim = sum(params[n].numel() for n in names)
    flat_mask = None
    if masks is not None:
        flat_mask = torch.cat([masks[n].reshape(-1) for n in names]).to(first.dtype)
    routes = _Routes(model, names, params, loss_fn, batch_loss) if per_sample else None
    buffer, spare, filled, done = None, None, 0, 0
    while done < num_grads:
        batch = to_device(next(batches), first.device)
        was_training = model.training
        model.eval()
        try:
            if per_sample:
                count, write = routes.rows(batch, num_grads - done - filled)
            else:
                row = torch.empty(1, dim, dtype=first.dtype, device=first.device)
                _gradient_row(model, names, params, _as_batch_loss(loss_fn, batch_loss), batch, row[0])
                count, write = 1, _slices_of(row)
        finally:
            model.train(was_training)
        taken = 0
        while taken < count:
            if buffer is None:
                rows = min(chunk_rows or count - taken, num_grads - done)
                if reuse_chunks and spare is not None and len(spare) == rows:
                    buffer = spare
                else:
                    spare = None
                    buffer = torch.empty(rows, dim, dtype=first.dtype, device=first.device)
            step = min(count - taken, len(buffer) - filled)
            write(taken, taken + step, buffer[filled: filled + step])
            taken += step
            filled += step
            if filled == len(buffer):
                if flat_mask is not None:
                    buffer.mul_(flat_mask)
                done += filled
                chunk, buffer, filled = buffer, None, 0
                yield chunk
                spare = chunk if reuse_chunks else None
                del chunk  # the consumer is done with it: do not hold it while computing the next one
        del write


def _as_batch_loss(loss_fn, batch_loss):
    """The loss as ``batch_loss(model, batch)``: given, or ``loss_fn(model(inputs), targets)``."""
    if batch_loss is not None:
        return batch_loss

    def loss_of(net, pair):
        return loss_fn(net(pair[0]), pair[1])
    return loss_of


def _slices_of(rows: torch.Tensor):
    """A writer over precomputed (n, d) rows: ``write(i0, i1, out)`` copies rows i0..i1 into out."""
    def write(i0, i1, out):
        out.copy_(rows[i0:i1])
    return write


def collect_gradients(model: nn.Module, params: Mapping[str, torch.Tensor], batches: Iterator,
                      loss_fn: Callable | None = None, num_grads: int = 1, per_sample: bool = False,
                      masks: Mapping[str, torch.Tensor] | None = None, on_rows: Callable[[int], Any] | None = None, *,
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


class _NotApplicable(Exception):
    """The Linear-layer route cannot compute this model's per-sample gradients."""


class _Routes:
    """Chooses, once per model and loss, how per-sample gradients are computed, fastest first:

    1. ``linear``: when every chosen parameter is the weight or bias of an ``nn.Linear`` that owns
       it alone, one forward and backward pass of the whole batch, with forward hooks keeping each
       layer's input a and asking autograd for the gradient g of its output; sample i's weight
       gradient is then sum_t g_it a_it^T (t runs over sequence positions), a batched matrix product.
       With ``batch_loss`` the loss must be the mean over samples of each sample's own loss (as
       Hugging Face classification losses are), so the gradients are scaled by the batch size; with
       ``loss_fn`` each sample's loss is taken separately and summed. On the first batch two rows
       are checked against single-sample backward passes; a mismatch (a token-weighted loss, a
       weight also used outside its layer, a sequence-first layout) falls back, with a warning.
    2. ``vmap``: torch.func.vmap of the gradient of one sample's loss.
    3. ``loop``: one backward pass per sample, where vmap cannot run the model (it inspects tensor
       values in Python, as Hugging Face's attention-mask code does); with a warning.
    """

    def __init__(self, model, names, params, loss_fn, batch_loss):
        self.model, self.names, self.params = model, names, params
        self.loss_fn, self.batch_loss = loss_fn, batch_loss
        self.owners = _linear_owners(model, names, params)
        self.route = "linear" if self.owners is not None else "vmap"
        self.checked = False

    def rows(self, batch, limit):
        """(n, write): the number of rows this batch gives (n <= limit) and a writer that fills
        ``out`` (i1 - i0, d) with rows i0..i1."""
        if self.batch_loss is None:
            inputs, targets = batch
            n = min(len(inputs), limit)
            batch = (inputs[:n], targets[:n])
        else:
            n = min(samples_in(batch), limit)
            batch = tree_map(lambda t: t[:n] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, batch)
        if self.route == "linear":
            try:
                write = _linear_rows(self.model, self.names, self.params, self.owners, batch, n, self.loss_fn,
                                     self.batch_loss)
                if not self.checked:
                    self._check(write, batch, n)
                    self.checked = True
                return n, write
            except _NotApplicable as why:
                self.route = "vmap"
                if str(why):
                    warnings.warn(f"per-sample gradients: {why}; using torch.func.vmap instead, which gives exact "
                                  "rows more slowly", RuntimeWarning, stacklevel=5)
        if self.route == "vmap":
            try:
                return n, _slices_of(self._vmap(batch, n))
            except RuntimeError as error:
                if self.batch_loss is None or "vmap" not in str(error):
                    raise
                self.route = "loop"
                warnings.warn("per-sample gradients: torch.func.vmap cannot run this model (it inspects tensor "
                              f"values in Python: {str(error).splitlines()[0][:120]}...); using a loop of "
                              "single-sample backward passes instead, which gives the same rows more slowly",
                              RuntimeWarning, stacklevel=5)
        first = self.params[self.names[0]]
        rows = torch.empty(n, sum(self.params[name].numel() for name in self.names), dtype=first.dtype,
                           device=first.device)
        for i in range(n):
            self._single(batch, i, rows[i])
        return n, _slices_of(rows)

    def _single(self, batch, i, out) -> None:
        """The gradient of sample i's own loss, by one backward pass."""
        if self.batch_loss is not None:
            sample = tree_map(lambda t: t[i:i + 1] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, batch)
            _gradient_row(self.model, self.names, self.params, self.batch_loss, sample, out)
        else:
            _gradient_row(self.model, self.names, self.params, _as_batch_loss(self.loss_fn, None),
                          (batch[0][i:i + 1], batch[1][i:i + 1]), out)

    def _check(self, write, batch, n) -> None:
        first = self.params[self.names[0]]
        dim = sum(self.params[name].numel() for name in self.names)
        fast = torch.empty(1, dim, dtype=first.dtype, device=first.device)
        exact = torch.empty(dim, dtype=first.dtype, device=first.device)
        for i in sorted({0, n - 1}):
            write(i, i + 1, fast)
            self._single(batch, i, exact)
            scale = float(torch.linalg.vector_norm(exact))
            if float(torch.linalg.vector_norm(fast[0] - exact)) > 1e-3 * scale + 1e-30:
                raise _NotApplicable("the Linear-layer route does not match a single-sample backward pass on this "
                                     "model and loss (is the loss the mean over samples of each sample's own loss?)")

    def _vmap(self, batch, n) -> torch.Tensor:
        model, names = self.model, self.names
        fixed = {k: v.detach() for k, v in model.named_parameters() if k not in self.params}
        fixed.update(dict(model.named_buffers()))
        chosen = {name: self.params[name].detach() for name in names}
        dim = sum(p.numel() for p in chosen.values())
        per_chunk = max(1, _VMAP_CHUNK_BYTES // max(1, dim * chosen[names[0]].element_size()))
        if self.batch_loss is None:
            loss_fn = self.loss_fn

            def loss_one(weights, x, y):
                return loss_fn(functional_call(model, {**fixed, **weights}, (x[None],)), y[None])

            grads = vmap(grad(loss_one), in_dims=(None, 0, 0), chunk_size=per_chunk)(chosen, *batch)
        else:
            batch_loss = self.batch_loss
            in_dims = tree_map(lambda t: 0 if isinstance(t, torch.Tensor) and t.dim() > 0 else None, batch)

            def loss_one(weights, sample):
                sample = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, sample)
                return batch_loss(_FunctionalModel(model, {**fixed, **weights}), sample)

            grads = vmap(grad(loss_one), in_dims=(None, in_dims), chunk_size=per_chunk)(chosen, batch)
        return torch.cat([grads[name].reshape(n, -1) for name in names], dim=1)


def _linear_owners(model, names, params):
    """name -> (Linear module, "weight" | "bias") when every chosen parameter belongs to exactly one
    module, a plain (not parametrized) nn.Linear; otherwise None."""
    uses: dict[int, int] = {}
    owners: dict[int, tuple[nn.Module, str]] = {}
    for module in model.modules():
        for kind, param in module.named_parameters(recurse=False):
            uses[id(param)] = uses.get(id(param), 0) + 1
            if isinstance(module, nn.Linear) and not parametrize.is_parametrized(module):
                owners[id(param)] = (module, kind)
    chosen = {}
    for name in names:
        key = id(params[name])
        if key not in owners or uses[key] != 1:
            return None
        chosen[name] = owners[key]
    return chosen


def _linear_rows(model, names, params, owners, batch, n, loss_fn, batch_loss):
    """One forward and backward pass of the batch; returns a writer of its per-sample rows (see
    :class:`_Routes`). Raises _NotApplicable when a layer's activations do not have the samples first."""
    modules = list({id(module): module for module, _ in owners.values()}.values())
    calls = {id(module): [] for module in modules}

    def keep(module, args, output):
        calls[id(module)].append((args[0].detach(), output))

    handles = [module.register_forward_hook(keep) for module in modules]
    try:
        with torch.enable_grad():
            if batch_loss is not None:
                loss = batch_loss(model, batch) * n
            else:
                outputs = model(batch[0])
                loss = sum(loss_fn(outputs[i:i + 1], batch[1][i:i + 1]) for i in range(n))
    finally:
        for handle in handles:
            handle.remove()
    if not all(calls[id(module)] for module in modules):
        raise _NotApplicable("")  # a layer the forward pass never called as a module (nn.MultiheadAttention's)
    outputs = [out for module in modules for _, out in calls[id(module)]]
    if not all(isinstance(out, torch.Tensor) and out.requires_grad for out in outputs) or not loss.requires_grad:
        raise _NotApplicable("")
    grads = iter(torch.autograd.grad(loss, outputs, allow_unused=True))
    pairs = {}
    for module in modules:
        pairs[id(module)] = []
        for inp, _ in calls[id(module)]:
            out_grad = next(grads)
            if out_grad is None:
                continue
            if inp.dim() < 2 or inp.shape[0] != n or out_grad.shape[0] != n:
                raise _NotApplicable("")  # samples not first: let vmap handle the layout
            pairs[id(module)].append((inp.reshape(n, -1, inp.shape[-1]), out_grad.reshape(n, -1, out_grad.shape[-1])))
    calls.clear()  # the pairs below keep what is needed; drop the graph's outputs
    del outputs, loss
    segments, offset = [], 0
    for name in names:
        module, kind = owners[name]
        size = params[name].numel()
        segments.append((offset, size, tuple(params[name].shape), pairs[id(module)], kind))
        offset += size

    def write(i0, i1, out):
        k = i1 - i0
        for start, size, shape, module_pairs, kind in segments:
            view = out[:, start: start + size].view(k, *shape)
            if not module_pairs:
                view.zero_()
            for position, (inp, out_grad) in enumerate(module_pairs):
                # Straight into the chunk: a fresh (k, out, in) result would cost page faults and a
                # copy as long as the product itself.
                if kind == "weight":
                    view.baddbmm_(out_grad[i0:i1].transpose(1, 2), inp[i0:i1], beta=1 if position else 0)
                elif position:
                    view.add_(out_grad[i0:i1].sum(1))
                else:
                    torch.sum(out_grad[i0:i1], 1, out=view)
    return write


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
