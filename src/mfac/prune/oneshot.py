"""One-shot pruning: Optimal Brain Surgeon with an M-FAC inverse Fisher, and magnitude pruning.

OBS removes the weights q with the lowest saliency w_q^2 / (2 [F^-1]_qq) and moves the survivors
by dw = -F^-1 r, r_q = w_q / [F^-1]_qq on the removed weights (the sum of the single-weight OBS
updates: one inverse-Hessian-vector product with a sparse right-hand side). F is the damped
empirical Fisher of fresh gradients of the still-alive weights, through
:class:`mfac.fisher.BlockFisherInverse` (or the exact static inverse with ``block_size=None``).
When ``block_size <= num_grads`` the block statistics are accumulated from gradient chunks as they
are computed (:meth:`BlockFisherInverse.from_chunks`), so the (num_grads, d) gradient matrix is
never held: memory d * block_size numbers, which is what lets OBS reach transformers.
With ``recompute=n`` the target is reached in n sub-steps of geometrically falling density, each
with new gradients and a new inverse, which is what lets OBS beat magnitude at high sparsity.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..fisher import BlockFisherInverse, StaticFisherInverse
from ..fisher.base import check_damping
from ..grads import check_loss, collect_gradients, cycle, gradient_chunks, prunable_parameters
from .masks import Masks, parameter_by_name

__all__ = ["prune_oneshot"]

METHODS = ("obs", "magnitude")
# Default damping: each block's lambda is this fraction of its mean Fisher diagonal (see BENCHMARKS.md,
# "Choosing the damping", for the held-out measurements behind it).
DEFAULT_RELATIVE_DAMP = 0.3
_MIN_CHUNK_BYTES = 1 << 26  # gradient rows buffered before each streamed block update: at least 64 MB
SCOPES = ("global", "layer")


@dataclass
class _Segment:
    name: str
    param: nn.Parameter
    start: int
    stop: int


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """"N:M" -> (N, M): remove N of every M consecutive weights along a row."""
    if pattern is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise ValueError(f"pattern must be 'N:M' with 0 < N < M, such as '2:4', got {pattern!r}")
    return int(match[1]), int(match[2])


def resolve_params(model: nn.Module, params) -> dict[str, nn.Parameter]:
    """Names -> Parameters to prune: the default set, or the names/Parameters given (checked)."""
    if params is None:
        names = list(prunable_parameters(model))
    else:
        if isinstance(params, (str, torch.Tensor)):
            params = [params]
        by_id = {id(p): n for n, p in model.named_parameters()}
        names = []
        for item in params:
            if isinstance(item, torch.Tensor):
                if id(item) not in by_id:
                    raise ValueError("params: a tensor passed in params is not a parameter of this model")
                names.append(by_id[id(item)])
            else:
                names.append(str(item))
    if not names:
        raise ValueError("params: there is nothing to prune (the model has no Linear or Conv layers; pass params)")
    resolved = {}
    for name in names:
        try:
            resolved[name] = parameter_by_name(model, name)
        except KeyError as error:
            raise ValueError(f"params: {error.args[0]}") from None
        module = model.get_submodule(name.rpartition(".")[0])
        if parametrize.is_parametrized(module):
            raise RuntimeError(f"{name!r} has a mask attached; call handle.remove() before pruning again")
    return resolved


def _check_positive_int(name: str, value, allow_none: bool = False):
    if allow_none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1{' or None' if allow_none else ''}, got {value!r}")
    return value


def _select(scores: torch.Tensor, segments: list[_Segment], counts: list[int] | int | None,
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


def _geometric_counts(size: int, pruned_now: int, sparsity: float, steps: int) -> list[int]:
    """Numbers of pruned entries after each of ``steps`` sub-steps, densities falling geometrically
    from the current one to 1 - sparsity; the last is exactly round(sparsity * size)."""
    final = round(sparsity * size)
    start, end = 1 - pruned_now / size, 1 - final / size
    counts = [size - round(size * start * (end / start) ** (j / steps)) for j in range(1, steps + 1)]
    counts[-1] = final
    return [max(pruned_now, c) for c in counts]


@torch.no_grad()
def prune_oneshot(model: nn.Module, sparsity: float | None = None, data: Iterable | None = None, loss_fn=None,
                  method: str = "obs", num_grads: int = 256, damp: float | None = None, block_size: int | None = 128,
                  recompute: int = 16, per_sample: bool = False, scope: str = "global", pattern: str | None = None,
                  params=None, masks: Masks | None = None, callback=None, on_gradient_rows=None, *,
                  batch_loss=None, relative_damp: float | None = None, process_group=None) -> Masks:
    """Prune ``model`` in place and return the masks (True = kept).

    Args:
        sparsity: fraction of the chosen weights to remove, in [0, 1). With ``pattern`` it may be
            None (it is then N/M).
        data: any re-iterable of batches, cycled as needed (OBS only): (inputs, targets) pairs for
            ``loss_fn``, or any structure of tensors (e.g. Hugging Face dicts) for ``batch_loss``.
        loss_fn: ``loss_fn(outputs, targets)`` -> scalar mean loss of ``model(inputs)`` (OBS only).
        batch_loss: instead of ``loss_fn``, ``batch_loss(model, batch)`` -> scalar mean loss, for
            models that take other batches or compute their own loss
            (``lambda model, batch: model(**batch).loss``).
        method: "obs" (second order, needs data) or "magnitude" (|w|, needs none).
        num_grads: rows of G per inverse: mini-batch gradients, or samples with ``per_sample``.
        damp: an absolute lambda for every block. Default (None): relative damping.
        relative_damp: lambda as a fraction of the mean diagonal of the Fisher over all pruned
            weights (default ``DEFAULT_RELATIVE_DAMP`` = 0.3, chosen on held-out splits of the digits
            MLP and ResNet-20, see BENCHMARKS.md); it follows the gradients' scale, so one value
            serves models whose gradients differ by orders of magnitude. Smaller trusts the
            curvature more; very large values turn OBS into magnitude pruning.
        block_size: coordinates per diagonal block of F (None: one block, the exact inverse).
            When ``block_size <= num_grads`` the blocks are accumulated from gradient chunks and the
            gradient matrix is never held. Published: 128 (M-FAC), 50 (oBERT, with 1024 gradients).
            Larger blocks capture more correlations at d * block_size memory and O(d * block_size^2)
            time; use the largest that fits (memory is checked up front).
        recompute: sub-steps for OBS, each with fresh gradients and inverse (16 as published).
        scope: "global" (one ranking over all chosen weights) or "layer" (the same sparsity in
            every tensor).
        pattern: "N:M" semi-structured sparsity, e.g. "2:4": remove N of every M consecutive
            weights of each row (Linear: along in_features; Conv: along in_channels*kh*kw).
        params: names or Parameters to prune (default: the weights of every Linear and Conv layer).
        masks: masks from an earlier pruning; pruned entries stay pruned.
        callback: called as ``callback(done, total, sparsity)`` after every sub-step (progress).
        on_gradient_rows: called as ``on_gradient_rows(n)`` whenever n more gradient rows are in.
        process_group: prune data-parallel over the processes of a ``torch.distributed`` group,
            every process calling with its own ``data`` (e.g. a DistributedSampler's share): each
            computes its share of the ``num_grads`` rows, the block statistics are summed over the
            processes (one all-reduce of d * B numbers per sub-step), and every process ends with
            the same masks and weights. Needs ``block_size <= num_grads`` for OBS (the streamed
            route).

    Cost per OBS sub-step: ``num_grads`` gradient evaluations, then O(d * num_grads * min(block, num_grads))
    for the inverse, its diagonal and one ihvp. Peak memory per sub-step, besides the model:
    B <= m (streamed): d*B*4 bytes of block statistics + a buffer of gradient rows of max(64 MB,
    d*B) bytes + 384 MB of float64 tiles; B > m or block_size=None: the (m, d) gradient matrix plus the
    factors, d*min(B, m)*4 bytes (both checked against available memory before they are allocated).
    Bad arguments raise before the model is touched; an error while pruning restores the original
    weights.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    nm = parse_pattern(pattern)
    if nm is not None and sparsity is not None and not math.isclose(sparsity, nm[0] / nm[1]):
        raise ValueError(f"sparsity {sparsity} contradicts pattern {pattern!r} (which means {nm[0] / nm[1]:g}); "
                         f"pass sparsity=None with a pattern")
    if nm is None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    _check_positive_int("num_grads", num_grads)
    _check_positive_int("recompute", recompute)
    _check_positive_int("block_size", block_size, allow_none=True)
    damp, relative_damp = check_damping(damp, DEFAULT_RELATIVE_DAMP if damp is None and relative_damp is None
                                        else relative_damp)
    if method == "obs":
        if data is None:
            raise ValueError("method='obs' needs data (an iterable of batches) and loss_fn or batch_loss; use "
                             "method='magnitude' to prune without data")
        check_loss(loss_fn, batch_loss)
        if process_group is not None and (block_size is None or block_size > num_grads):
            raise ValueError(f"OBS over a process_group streams block statistics, which needs block_size <= "
                             f"num_grads; got block_size={block_size}, num_grads={num_grads}")
    chosen = resolve_params(model, params)
    segments, offset = [], 0
    for name, param in chosen.items():
        segments.append(_Segment(name, param, offset, offset + param.numel()))
        offset += param.numel()
        if nm is not None and (param.dim() < 2 or param[0].numel() % nm[1]):
            raise ValueError(f"pattern {pattern!r} needs rows whose length divides by {nm[1]}, but {name!r} has "
                             f"rows of {param[0].numel() if param.dim() >= 2 else param.numel()} weights; "
                             f"leave it out with params=")
    if masks is not None:
        missing = set(chosen) - set(masks)
        if missing:
            raise ValueError(f"masks has no entry for {sorted(missing)}")
    size = offset
    alive = torch.cat([(masks[s.name] if masks is not None else torch.ones_like(s.param, dtype=torch.bool))
                       .reshape(-1).to(s.param.device) for s in segments])
    original = torch.cat([s.param.detach().reshape(-1) for s in segments])

    if nm is not None:
        steps = min(recompute, nm[0]) if method == "obs" else 1
        plan = [(None, (math.ceil(nm[0] * j / steps), nm[1])) for j in range(1, steps + 1)]
    else:
        steps = recompute if method == "obs" else 1
        if scope == "global":
            plan = [(c, None) for c in _geometric_counts(size, int((~alive).sum()), sparsity, steps)]
        else:
            per_segment = [_geometric_counts(s.stop - s.start, int((~alive[s.start: s.stop]).sum()), sparsity, steps)
                           for s in segments]
            plan = [([counts[j] for counts in per_segment], None) for j in range(steps)]

    batches = cycle(data) if method == "obs" else None
    weights = original.clone()
    try:
        for done, (counts, per_group) in enumerate(plan, start=1):
            weights, alive = _prune_step(model, segments, weights, alive, counts, per_group, method, batches,
                                         _Loss(loss_fn, batch_loss, process_group), num_grads,
                                         (damp, relative_damp), block_size,
                                         per_sample, on_gradient_rows)
            if callback is not None:
                callback(done, len(plan), 1.0 - float(alive.float().mean()))
    except BaseException:
        _write(segments, original)
        raise
    return Masks({s.name: alive[s.start: s.stop].reshape(s.param.shape).clone() for s in segments})


def _write(segments: list[_Segment], flat: torch.Tensor) -> None:
    for s in segments:
        s.param.copy_(flat[s.start: s.stop].view_as(s.param))


@dataclass
class _Loss:
    """How gradient rows are made: the loss, and the process group that shares the rows (or None)."""

    loss_fn: object
    batch_loss: object
    group: object = None


def _inverse(model, segments, alive, batches, loss: _Loss, num_grads, damping, block_size, per_sample,
             on_gradient_rows):
    """Fresh gradients of the alive weights and their block-diagonal (or exact) inverse Fisher."""
    damp, relative = damping
    named = {s.name: s.param for s in segments}
    flat_masks = {s.name: alive[s.start: s.stop].view_as(s.param) for s in segments}
    if block_size is not None and block_size <= num_grads:
        first = segments[0].param
        dim = segments[-1].stop
        # Rows in each streamed update: a rank-n product, not rank-1, in at most a quarter of the
        # float32 statistics' own d * B * 4 bytes (and at least 64 MB).
        buffer_bytes = max(_MIN_CHUNK_BYTES, dim * min(block_size, dim))
        rows = max(1, min(num_grads, buffer_bytes // (dim * first.element_size())))
        reduce, local_grads = None, num_grads
        if loss.group is not None:  # this process's share of the rows; the statistics are summed
            from ..distributed import ShardLayout, sum_over

            share = ShardLayout.of(num_grads, loss.group)
            reduce, local_grads = sum_over(loss.group), share.size
        # Pruned coordinates are zeroed in the block statistics once (mask=), not in every chunk.
        chunks = gradient_chunks(model, named, batches, local_grads, loss.loss_fn, loss.batch_loss, per_sample,
                                 chunk_rows=rows, reuse_chunks=True)
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        return BlockFisherInverse.from_chunks(chunks, dim, block_size, damp=damp,
                                              relative_damp=relative, device=first.device, dtype=dtype,
                                              on_rows=on_gradient_rows, mask=alive, reduce=reduce)
    grads = collect_gradients(model, named, batches, loss.loss_fn, num_grads, per_sample, masks=flat_masks,
                              on_rows=on_gradient_rows, batch_loss=loss.batch_loss)
    if block_size is None:
        return StaticFisherInverse(grads, damp, relative_damp=relative)
    return BlockFisherInverse(grads, damp, block_size, relative_damp=relative)


def _prune_step(model, segments, weights, alive, counts, per_group, method, batches, loss, num_grads, damping,
                block_size, per_sample, on_gradient_rows):
    """One sub-step: rank, remove, and (OBS) update the survivors; returns (weights, alive)."""
    if method == "obs":
        finv = _inverse(model, segments, alive, batches, loss, num_grads, damping, block_size, per_sample,
                        on_gradient_rows)
        diag = finv.diag().to(weights.dtype)
        scores = weights.square() / (2 * diag)
    else:
        scores = weights.abs()
    scores = scores.masked_fill(~alive, -math.inf)
    new_alive = alive & _select(scores, segments, counts, per_group)
    if method == "obs":
        removed = alive & ~new_alive
        rhs = torch.zeros_like(weights)
        rhs[removed] = weights[removed] / diag[removed]
        weights = weights - finv.ihvp(rhs.to(finv.dtype)).to(weights.dtype)
    weights = weights.masked_fill(~new_alive, 0.0)
    _write(segments, weights)
    return weights, new_alive
