"""What every prune shares: the chosen tensors laid end to end, where gradient rows come from, the
fresh inverse Fisher of each sub-step, and the geometric schedule of sub-steps.

:func:`mfac.prune.prune_oneshot` (weights, N:M) and :func:`mfac.prune.structured.prune_structures`
(whole structures) both run on these.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_map

from ..fisher import BlockFisherInverse, FisherInverse, StaticFisherInverse
from ..grads import check_loss, collect_gradients, cycle, gradient_chunks, samples_in, to_device
from .settings import PruneSettings
from .sharing import RowSharing

__all__ = ["Segment", "GradientSource", "PruningRun", "Batches", "geometric_counts", "select_keep", "check_data",
           "check_first_batch"]

_MODEL_NAMES = ("model", "net", "module", "network")  # a loss_fn whose first argument is called so wants a model
_PROBE_SAMPLES = 4  # samples of the first batch whose own losses are compared with their batch loss (per_sample)

_MIN_CHUNK_BYTES = 1 << 26  # gradient rows buffered before each streamed block update: at least 64 MB


@dataclass
class Segment:
    name: str
    param: nn.Parameter
    start: int
    stop: int




def select_keep(scores: torch.Tensor, segments: list[Segment], counts: list[int] | int | None,
            per_group: tuple[int, int] | None) -> torch.Tensor:
    """Keep mask (d,) that removes the lowest scores: ``counts`` in total (int), per segment (list),
    or ``per_group = (n, M)``: n in every group of M consecutive entries of each row."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if per_group is not None:
        n, group = per_group
        for seg in segments:
            grouped = scores[seg.start: seg.stop].reshape(-1, group)
            lowest = grouped.topk(n, dim=1, largest=False).indices
            keep[seg.start: seg.stop] = keep[seg.start: seg.stop].reshape(-1, group).scatter(1, lowest, False).reshape(-1)
    elif isinstance(counts, int):
        keep[scores.topk(counts, largest=False).indices] = False
    else:
        for seg, count in zip(segments, counts):
            lowest = scores[seg.start: seg.stop].topk(count, largest=False).indices
            keep[seg.start + lowest] = False
    return keep


def geometric_counts(size: int, pruned_now: int, sparsity: float, steps: int) -> list[int]:
    """Numbers of pruned entries after each of ``steps`` sub-steps, densities falling geometrically
    from the current one to 1 - sparsity; the last is exactly round(sparsity * size)."""
    final = round(sparsity * size)
    start, end = 1 - pruned_now / size, 1 - final / size
    counts = [size - round(size * start * (end / start) ** (j / steps)) for j in range(1, steps + 1)]
    counts[-1] = final
    return [max(pruned_now, c) for c in counts]




class Batches:
    """The batches of a :class:`GradientSource`: ``data`` cycled, whose next batch can be read
    without taking it (:meth:`peek`), so the first one is checked before any work."""

    def __init__(self, data: Iterable) -> None:
        self._cycle, self._held = cycle(data), []
        self.checked = False  # set once the first batch has been checked (check_first_batch)

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> Any:
        return self._held.pop() if self._held else next(self._cycle)

    def peek(self) -> Any:
        """The next batch, left in place."""
        if not self._held:
            self._held.append(next(self._cycle))
        return self._held[0]


def check_data(data: Any, loss_fn: Callable | None) -> None:
    """Refuse ``data`` that OBS cannot go over again and again, before any work: an iterator or
    generator (used up after one pass), one tensor, or one ``(X, Y)`` batch instead of a list of them."""
    if isinstance(data, Iterator):
        raise TypeError(f"data is a {type(data).__name__}, an iterator that is used up after one pass, but pruning "
                        f"goes over the data again for every recompute sub-step; pass a list of batches "
                        f"(data=list(...)) or a re-iterable such as a DataLoader")
    if isinstance(data, torch.Tensor):
        raise TypeError(f"data is one tensor of shape {tuple(data.shape)}, whose items are its rows; pass a list of "
                        f"batches, e.g. [(X, Y)]")
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in data):
        x, y = data
        if x.shape[0] == y.shape[0] > 1 and (loss_fn is not None or x.shape[1:] != y.shape[1:]):
            raise TypeError(f"data is one tuple of two tensors of {x.shape[0]} rows each, which reads as one (inputs, "
                            f"targets) batch; data is an iterable of batches: wrap it in a list: data=[(X, Y)] (or "
                            f"split it into several batches)")


def _check_loss_takes_outputs(loss_fn: Callable | None) -> None:
    """A ``loss_fn`` written as ``lambda model, batch: ...`` belongs in ``batch_loss``."""
    try:
        names = list(inspect.signature(loss_fn).parameters) if loss_fn is not None else []
    except (TypeError, ValueError):  # builtins without a signature
        return
    if names and names[0] in _MODEL_NAMES:
        raise TypeError(f"loss_fn takes ({', '.join(names)}), but it is called as loss_fn(model(inputs), targets) on "
                        f"(inputs, targets) batches; a loss of the model and a batch goes in batch_loss= "
                        f"(called as batch_loss(model, batch))")


def _loss_on(model, batch, loss_fn, batch_loss):
    """The loss of ``batch``, as gradients are computed from it, with errors that name the argument."""
    if batch_loss is not None:
        return batch_loss(model, batch)
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"with loss_fn, every batch must be an (inputs, targets) pair (loss_fn(model(inputs), "
                        f"targets) is its loss), but the first batch is a {type(batch).__name__}"
                        f"{f' of {len(batch)} items' if isinstance(batch, (tuple, list)) else ''}; for batches of "
                        f"another structure (dicts, ...), pass batch_loss=lambda model, batch: ... instead")
    outputs = model(batch[0])
    try:
        return loss_fn(outputs, batch[1])
    except (TypeError, AttributeError) as error:
        raise TypeError(f"loss_fn failed on the first batch ({error}); it is called as loss_fn(outputs, targets) with "
                        f"outputs = model(inputs): if it takes the model and the batch, pass it as batch_loss=") \
            from error


def _scalar(loss, name: str) -> float:
    if not isinstance(loss, torch.Tensor):
        hint = ": return model(**batch).loss" if hasattr(loss, "loss") else ""
        raise TypeError(f"{name} must return a scalar tensor (the mean loss of the batch), got "
                        f"{type(loss).__name__}{hint}")
    if loss.numel() != 1:
        raise ValueError(f"{name} returned a tensor of shape {tuple(loss.shape)}, not a scalar: a loss with "
                         f"reduction='none'? OBS needs the mean loss of the batch: use reduction='mean' (the "
                         f"default) or take .mean() of it")
    return float(loss)


@torch.no_grad()
def check_first_batch(model: nn.Module, batch: Any, loss_fn: Callable | None, batch_loss: Callable | None,
                      per_sample: bool, device: torch.device) -> None:
    """Compute the loss of the first batch once (eval mode, no gradient) and refuse, naming the
    argument and the fix, a batch the loss cannot take, a loss that is not a scalar, and, with
    ``per_sample``, a loss that sums over the samples instead of averaging them (the loss of a
    few samples compared with the mean of their own losses). Costs one forward pass (per-sample:
    one of a few samples and one of each of them). ``batch`` is moved to ``device`` first."""
    name = "loss_fn" if batch_loss is None else "batch_loss"
    batch = to_device(batch, device)
    was_training = model.training
    model.eval()
    try:
        if not per_sample:
            _scalar(_loss_on(model, batch, loss_fn, batch_loss), name)
            return
        count = min(samples_in(batch), _PROBE_SAMPLES)
        cut = [tree_map(lambda t: t[i:j] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, batch)
               for i, j in [(0, count)] + [(i, i + 1) for i in range(count)]]
        together, *alone = [_scalar(_loss_on(model, part, loss_fn, batch_loss), name) for part in cut]
    finally:
        model.train(was_training)
    mean = sum(alone) / count

    def close(a, b):
        return abs(a - b) <= 1e-4 * max(abs(a), abs(b)) + 1e-12

    if count > 1 and close(together, count * mean) and not close(together, mean):
        raise ValueError(f"per_sample=True: on the first batch the loss of {count} samples is {together:.6g}, {count} "
                         f"times the mean of their own losses ({mean:.6g}): {name} sums over the samples "
                         f"(reduction='sum'?), but it must return the mean loss of the batch; use reduction='mean'")


def _warn_unshared(settings: PruneSettings) -> None:
    """Under an initialised process group of several processes, pruning without ``process_group=``
    is most likely a mistake: say so, naming the argument."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return
    warnings.warn(f"torch.distributed is initialised with {dist.get_world_size()} processes, but no process_group= was "
                  f"passed: each process computes all {settings.num_grads} gradient rows from its own data and the "
                  f"processes may end with different masks; pass process_group=torch.distributed.group.WORLD to "
                  f"share the rows (or ignore this if each process prunes its own model on purpose)",
                  UserWarning, stacklevel=4)


@dataclass(frozen=True)
class GradientSource:
    """Where OBS's gradient rows come from: an endless iterator of batches, the loss (exactly one of
    ``loss_fn(outputs, targets)`` and ``batch_loss(model, batch)``), how the rows are shared over a
    process group (None: this process computes them all), and a progress hook ``on_rows(n)``."""

    batches: Batches
    loss_fn: Callable | None = None
    batch_loss: Callable | None = None
    sharing: RowSharing | None = None
    on_rows: Callable | None = None

    @classmethod
    def of(cls, settings: PruneSettings, data: Iterable | None, loss_fn: Callable | None = None,
           batch_loss: Callable | None = None, process_group: Any = None,
           on_rows: Callable[[int], Any] | None = None) -> "GradientSource | None":
        """Checked: None for magnitude pruning (which needs no gradients); for OBS, ``data`` (a
        re-iterable of batches, cycled) and exactly one loss (a callable, not a class; ``loss_fn``
        taking outputs, not a model), and with a process group the streamed route (block_size <=
        num_grads); without one, under an initialised process group of several processes, a warning.
        The first batch is checked against the model later, by :class:`PruningRun`."""
        if settings.method != "obs":
            return None
        if data is None:
            raise ValueError("method='obs' needs data (an iterable of batches) and loss_fn or batch_loss; use "
                             "method='magnitude' to prune without data")
        check_loss(loss_fn, batch_loss)
        _check_loss_takes_outputs(loss_fn)
        check_data(data, loss_fn)
        sharing = None
        if process_group is None:
            _warn_unshared(settings)
        else:
            if not settings.streamed:
                raise ValueError(f"OBS over a process_group streams block statistics, which needs block_size <= "
                                 f"num_grads; got block_size={settings.block_size!r}, num_grads={settings.num_grads}: "
                                 f"pass an int block_size of at most num_grads, or raise num_grads")
            sharing = RowSharing.of(process_group, settings.num_grads)
        return cls(Batches(data), loss_fn, batch_loss, sharing, on_rows)


@dataclass
class PruningRun:
    """One prune's fixed parts: the model, its chosen tensors laid end to end, the settings and where
    the gradients come from."""

    model: nn.Module
    segments: list[Segment]
    settings: PruneSettings
    source: GradientSource | None

    def write(self, flat: torch.Tensor) -> None:
        for s in self.segments:
            s.param.copy_(flat[s.start: s.stop].view_as(s.param))

    def check_gradients(self) -> None:
        """Refuse, before any work, what OBS cannot take gradients of: frozen parameters (named) and,
        once per source, a first batch or loss that does not work (:func:`check_first_batch`)."""
        frozen = [s.name for s in self.segments if not s.param.requires_grad]
        if frozen:
            raise ValueError(f"method='obs' needs gradients of the weights it prunes, but these {len(frozen)} have "
                             f"requires_grad=False: {frozen[:8]}{' ...' if len(frozen) > 8 else ''}; unfreeze them "
                             f"for the prune (p.requires_grad_(True)), leave them out with params=, or prune them "
                             f"by magnitude (method='magnitude')")
        batches = self.source.batches
        if not batches.checked:
            check_first_batch(self.model, batches.peek(), self.source.loss_fn, self.source.batch_loss,
                              self.settings.per_sample, self.segments[0].param.device)
            batches.checked = True

    def inverse(self, alive: torch.Tensor) -> FisherInverse:
        """Fresh gradients of the alive weights and their block-diagonal (or exact) inverse Fisher."""
        settings, source = self.settings, self.source
        self.check_gradients()
        named = {s.name: s.param for s in self.segments}
        first, dim = self.segments[0].param, self.segments[-1].stop
        if settings.streamed:
            # Rows in each streamed update: a rank-n product, not rank-1, in d * B bytes (at least
            # 64 MB): 32 float32 rows at B = 128, 0.4 of the packed statistics.
            buffer_bytes = max(_MIN_CHUNK_BYTES, dim * min(settings.block_size, dim))
            rows = max(1, min(settings.num_grads, buffer_bytes // (dim * first.element_size())))
            sharing = source.sharing  # with one, this process computes its share and the statistics are summed
            # Pruned coordinates are zeroed in the block statistics once (mask=), not in every chunk.
            chunks = gradient_chunks(self.model, named, source.batches,
                                     sharing.rows if sharing is not None else settings.num_grads, source.loss_fn,
                                     source.batch_loss, settings.per_sample, chunk_rows=rows, reuse_chunks=True)
            return BlockFisherInverse.from_chunks(
                chunks, dim, settings.block_size, damp=settings.damp, relative_damp=settings.relative_damp,
                device=first.device, dtype=torch.float64 if first.dtype == torch.float64 else torch.float32,
                on_rows=source.on_rows, mask=alive, reduce=sharing.sum if sharing is not None else None)
        flat_masks = {s.name: alive[s.start: s.stop].view_as(s.param) for s in self.segments}
        grads = collect_gradients(self.model, named, source.batches, source.loss_fn, settings.num_grads,
                                  settings.per_sample, masks=flat_masks, on_rows=source.on_rows,
                                  batch_loss=source.batch_loss)
        if settings.exact:
            return StaticFisherInverse(grads, settings.damp, relative_damp=settings.relative_damp)
        return BlockFisherInverse(grads, settings.damp, settings.block_size, relative_damp=settings.relative_damp)

    def step(self, weights: torch.Tensor, alive: torch.Tensor, counts: list[int] | int | None,
             per_group: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One sub-step: rank, remove, and (OBS) update the survivors; returns (weights, alive)."""
        obs = self.settings.method == "obs"
        if obs:
            finv = self.inverse(alive)
            diag = finv.diag().to(weights.dtype)
            scores = weights.square() / (2 * diag)
        else:
            scores = weights.abs()
        scores = scores.masked_fill(~alive, -math.inf)
        new_alive = alive & select_keep(scores, self.segments, counts, per_group)
        if obs:
            removed = alive & ~new_alive
            rhs = torch.zeros_like(weights)
            rhs[removed] = weights[removed] / diag[removed]
            weights = weights - finv.ihvp(rhs.to(finv.dtype)).to(weights.dtype)
        weights = weights.masked_fill(~new_alive, 0.0)
        self.write(weights)
        return weights, new_alive
