"""What every prune shares: the chosen tensors laid end to end, where gradient rows come from, the
fresh inverse Fisher of each sub-step, and the geometric schedule of sub-steps.

:func:`mfac.prune.prune_oneshot` (weights, N:M) and :func:`mfac.prune.structured.prune_structures`
(whole structures) both run on these.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..fisher import BlockFisherInverse, StaticFisherInverse
from ..grads import check_loss, collect_gradients, cycle, gradient_chunks
from .settings import PruneSettings
from .sharing import RowSharing

__all__ = ["Segment", "GradientSource", "PruningRun", "geometric_counts", "select_keep"]

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




@dataclass(frozen=True)
class GradientSource:
    """Where OBS's gradient rows come from: an endless iterator of batches, the loss (exactly one of
    ``loss_fn(outputs, targets)`` and ``batch_loss(model, batch)``), how the rows are shared over a
    process group (None: this process computes them all), and a progress hook ``on_rows(n)``."""

    batches: Iterator
    loss_fn: Callable | None = None
    batch_loss: Callable | None = None
    sharing: RowSharing | None = None
    on_rows: Callable | None = None

    @classmethod
    def of(cls, settings: PruneSettings, data: Iterable | None, loss_fn=None, batch_loss=None, process_group=None,
           on_rows=None) -> "GradientSource | None":
        """Checked: None for magnitude pruning (which needs no gradients); for OBS, ``data`` (cycled)
        and exactly one loss, and with a process group the streamed route (block_size <= num_grads)."""
        if settings.method != "obs":
            return None
        if data is None:
            raise ValueError("method='obs' needs data (an iterable of batches) and loss_fn or batch_loss; use "
                             "method='magnitude' to prune without data")
        check_loss(loss_fn, batch_loss)
        sharing = None
        if process_group is not None:
            if not settings.streamed:
                raise ValueError(f"OBS over a process_group streams block statistics, which needs block_size <= "
                                 f"num_grads; got block_size={settings.block_size!r}, num_grads={settings.num_grads}: "
                                 f"pass an int block_size of at most num_grads, or raise num_grads")
            sharing = RowSharing.of(process_group, settings.num_grads)
        return cls(cycle(data), loss_fn, batch_loss, sharing, on_rows)


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

    def inverse(self, alive: torch.Tensor):
        """Fresh gradients of the alive weights and their block-diagonal (or exact) inverse Fisher."""
        settings, source = self.settings, self.source
        named = {s.name: s.param for s in self.segments}
        first, dim = self.segments[0].param, self.segments[-1].stop
        if settings.streamed:
            # Rows in each streamed update: a rank-n product, not rank-1, in at most a quarter of the
            # float32 statistics' own d * B * 4 bytes (and at least 64 MB).
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

    def step(self, weights: torch.Tensor, alive: torch.Tensor, counts, per_group) -> tuple[torch.Tensor, torch.Tensor]:
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
