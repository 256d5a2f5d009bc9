"""One-shot pruning: Optimal Brain Surgeon with an M-FAC inverse Fisher, and magnitude pruning.

OBS removes the weights q with the lowest saliency w_q^2 / (2 [F^-1]_qq) and moves the survivors
by dw = -F^-1 r, r_q = w_q / [F^-1]_qq on the removed weights (the sum of the single-weight OBS
updates: one inverse-Hessian-vector product with a sparse right-hand side). F is the damped
empirical Fisher of fresh gradients of the still-alive weights, through
:class:`mfac.fisher.BlockFisherInverse` (or the exact static inverse with
``block_size=mfac.defaults.EXACT``). When ``block_size <= num_grads`` the block statistics are
accumulated from gradient chunks as they are computed (:meth:`BlockFisherInverse.from_chunks`), so
the (num_grads, d) gradient matrix is never held: memory about d * (block_size + 32) / 2 numbers
(each block's lower triangle), which is what lets OBS reach transformers. With ``recompute=n`` the
target is reached in n sub-steps of geometrically falling density, each with new gradients and a
new inverse, which is what lets OBS beat magnitude
at high sparsity.

:func:`prune_oneshot` checks its arguments once (a :class:`~mfac.prune.settings.PruneSettings`, the
target, a :class:`GradientSource`) and calls :func:`prune`, which :class:`~mfac.prune.GradualPruner`
calls too, with settings it checked itself.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..grads import prunable_parameters
from ..progress import pruning_hooks
from .masks import Masks, parameter_by_name
from .run import GradientSource, PruningRun, Segment, geometric_counts
from .settings import PruneSettings, check_target, parse_pattern
from .structured import prune_structured_call

# parse_pattern: re-exported from .settings, where it lives, for the command line.
# What ``params=`` takes: a name or Parameter, a sequence of them, or None (the default set).
ParamsArg = str | torch.Tensor | Sequence[str | torch.Tensor] | None

__all__ = ["prune_oneshot", "prune", "GradientSource", "resolve_params", "parse_pattern"]



def resolve_params(model: nn.Module, params: ParamsArg) -> dict[str, nn.Parameter]:
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


@torch.no_grad()
def prune_oneshot(model: nn.Module, sparsity: float | None = None, data: Iterable | None = None,
                  loss_fn: Callable | None = None, method: str = "obs", num_grads: int | None = None,
                  damp: float | None = None, block_size: int | str | None = None, recompute: int | None = None,
                  per_sample: bool = False, scope: str = "global", pattern: str | None = None,
                  params: ParamsArg = None, masks: Masks | None = None, callback: Callable | None = None,
                  on_gradient_rows: Callable | None = None, *, batch_loss: Callable | None = None,
                  relative_damp: float | None = None, process_group: Any = None,
                  structure: str | Sequence[str] | None = None, groups: Sequence | None = None,
                  progress: bool = False) -> Masks:
    """Prune ``model`` in place and return the masks (True = kept). ``None`` for a setting means its
    default, from :mod:`mfac.defaults`.

    Args:
        sparsity: fraction of the chosen weights to remove, in [0, 1). With ``pattern`` it may be
            None (it is then N/M).
        data: any re-iterable of batches, cycled as needed (OBS only): (inputs, targets) pairs for
            ``loss_fn``, or any structure of tensors (e.g. Hugging Face dicts) for ``batch_loss``.
            A list or a DataLoader, not a generator or iterator (used up after one pass: refused),
            and not one ``(X, Y)`` batch (pass ``[(X, Y)]``).
        loss_fn: ``loss_fn(outputs, targets)`` -> scalar mean loss of ``model(inputs)`` (OBS only),
            e.g. ``nn.CrossEntropyLoss()`` (an instance) or ``nn.functional.cross_entropy``.
        batch_loss: instead of ``loss_fn``, ``batch_loss(model, batch)`` -> scalar mean loss, for
            models that take other batches or compute their own loss
            (``lambda model, batch: model(**batch).loss``).
        method: "obs" (second order, needs data) or "magnitude" (|w|, needs none).
        num_grads: rows of G per inverse: mini-batch gradients, or samples with ``per_sample``
            (default ``PRUNE_NUM_GRADS`` = 256).
        damp: an absolute lambda. Default (None): relative damping.
        relative_damp: lambda as a fraction of the mean diagonal of the Fisher over all the chosen
            weights (weights pruned before count as zero), one lambda for every block (default
            ``PRUNE_RELATIVE_DAMP`` = 0.3, chosen on held-out splits of the digits MLP and ResNet-20,
            BENCHMARKS.md#choosing-the-damping); it follows the gradients' scale, so one value serves models whose
            gradients differ by orders of magnitude. Smaller trusts the curvature more; very large
            values turn OBS into magnitude pruning.
        block_size: coordinates per diagonal block of F (default ``PRUNE_BLOCK_SIZE`` = 128), or
            ``mfac.defaults.EXACT`` ("exact") for one block, the exact inverse. When
            ``block_size <= num_grads`` the blocks are accumulated from gradient chunks and the
            gradient matrix is never held. Published: 128 (M-FAC), 50 (oBERT, with 1024 gradients).
            Larger blocks capture more correlations at d * (block_size + 32) / 2 memory and
            O(d * block_size^2) time; use the largest that fits (memory is checked up front).
        recompute: sub-steps for OBS, each with fresh gradients and inverse (default
            ``PRUNE_RECOMPUTE`` = 16, as published).
        scope: "global" (one ranking over all chosen weights) or "layer" (the same sparsity in
            every tensor).
        pattern: "N:M" semi-structured sparsity, e.g. "2:4": remove N of every M consecutive
            weights of each row (Linear: along in_features; Conv: along in_channels*kh*kw).
        params: names or Parameters to prune (default: the weights of every Linear and Conv layer).
        masks: masks from an earlier pruning; pruned entries stay pruned.
        callback: called as ``callback(done, total, sparsity)`` after every sub-step (progress).
        on_gradient_rows: called as ``on_gradient_rows(n)`` whenever n more gradient rows are in.
        progress: show progress on stderr (default False): a tqdm bar when tqdm is installed and
            stderr is a terminal, otherwise a few plain lines; OBS counts the gradient rows, the
            slow part. Built on ``callback``/``on_gradient_rows``, which are still called.
        structure: remove whole structures instead of single weights: "neurons", "channels" or
            "heads" (or a tuple of them), found in the model by :func:`mfac.prune.find_structures`;
            ``sparsity`` is then the fraction of structures removed (each kind ranked across layers, or in every
            layer with ``scope="layer"``), by group OBS saliency (``method="obs"``) or the L2 norm of
            each structure's weights (``method="magnitude"``). The returned masks cover every
            parameter the structures touch; :func:`mfac.prune.compact` then rebuilds the model smaller.
        groups: instead of ``structure``, the structures as a list of
            :class:`mfac.prune.StructureGroup` (for models that are not recognised).
        process_group: prune data-parallel over the processes of a ``torch.distributed`` group,
            every process calling with its own ``data`` (e.g. a DistributedSampler's share): each
            computes its share of the ``num_grads`` rows, the block statistics are summed over the
            processes (one all-reduce of the packed statistics per sub-step), and every process
            ends with the same masks and weights. Needs ``block_size <= num_grads`` for OBS (the
            streamed route).

    Cost per OBS sub-step: ``num_grads`` gradient evaluations, then O(d * num_grads * min(block, num_grads))
    for the inverse, its diagonal and one ihvp. Peak memory per sub-step, besides the model:
    B <= m (streamed): about 2*d*(B+32) bytes of block statistics (their lower triangles) + a buffer
    of gradient rows of max(64 MB, d*B) bytes + 384 MB of float64 tiles; B > m or exact: the (m, d)
    gradient matrix plus the factors, d*min(B, m)*4 bytes (both checked against available memory
    before they are allocated).
    Bad arguments raise before the model is touched, saying what to do; for OBS also frozen weights
    among those pruned (named: OBS needs their gradients), and a first batch or loss that does not
    work (its loss is computed once to check: a scalar mean, not ``reduction='none'``, nor ``'sum'``
    with ``per_sample``). Under an initialised process group of several processes, OBS without
    ``process_group=`` warns. An error while pruning restores the original weights.
    """
    settings = PruneSettings(method=method, num_grads=num_grads, block_size=block_size, recompute=recompute,
                             per_sample=per_sample, scope=scope, damp=damp, relative_damp=relative_damp)
    sparsity, nm = check_target(sparsity, pattern)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    source = GradientSource.of(settings, data, loss_fn, batch_loss, process_group, on_gradient_rows)
    call = (model, settings, sparsity, nm, source, structure, groups, params, masks)
    return _with_progress(call, callback, on_gradient_rows) if progress else _dispatch(*call, callback)


def _with_progress(call: tuple, callback, on_gradient_rows) -> Masks:
    """:func:`_dispatch` of ``call`` with :func:`mfac.progress.pruning_hooks` (``progress=True``)."""
    settings, nm, source = call[1], call[3], call[4]
    rows = settings.num_grads if source is None or source.sharing is None else source.sharing.rows
    with pruning_hooks(settings.method, settings.sub_steps(nm), rows, "prune_oneshot", callback=callback,
                       on_gradient_rows=on_gradient_rows) as hooks:
        if source is not None:
            call = (*call[:4], dataclasses.replace(source, on_rows=hooks["on_gradient_rows"]), *call[5:])
        return _dispatch(*call, hooks["callback"])


def _dispatch(model, settings, sparsity, nm, source, structure, groups, params, masks, callback) -> Masks:
    """Structured pruning (``structure=`` or ``groups=``) or pruning of single weights."""
    if structure is not None or groups is not None:
        return prune_structured_call(model, settings, sparsity, nm, source, structure, groups, params, masks,
                                     callback)
    return prune(model, settings, sparsity, nm, source=source, params=params, masks=masks, callback=callback)


@torch.no_grad()
def prune(model: nn.Module, settings: PruneSettings, sparsity: float | None, nm: tuple[int, int] | None = None, *,
          source: GradientSource | None = None, params: ParamsArg = None, masks: Masks | None = None,
          callback: Callable | None = None) -> Masks:
    """Prune ``model`` in place to ``sparsity``, or to the N:M pattern ``nm``, with checked
    ``settings`` (and, for OBS, gradients from ``source``); returns the masks. ``params``, ``masks``
    and ``callback`` as for :func:`prune_oneshot`, which checks its arguments and calls this."""
    if settings.method == "obs" and source is None:
        raise ValueError("method='obs' needs a GradientSource (data and a loss); use method='magnitude' to prune "
                         "without data")
    segments = _segments(resolve_params(model, params), nm)
    if masks is not None:
        missing = {s.name for s in segments} - set(masks)
        if missing:
            raise ValueError(f"masks has no entry for {sorted(missing)}")
    alive = torch.cat([(masks[s.name] if masks is not None else torch.ones_like(s.param, dtype=torch.bool))
                       .reshape(-1).to(s.param.device) for s in segments])
    original = torch.cat([s.param.detach().reshape(-1) for s in segments])
    plan = _plan(settings, sparsity, nm, segments, alive)
    run = PruningRun(model, segments, settings, source)
    weights = original.clone()
    try:
        for done, (counts, per_group) in enumerate(plan, start=1):
            weights, alive = run.step(weights, alive, counts, per_group)
            if callback is not None:
                callback(done, len(plan), 1.0 - float(alive.float().mean()))
    except BaseException:
        run.write(original)
        raise
    return Masks({s.name: alive[s.start: s.stop].reshape(s.param.shape).clone() for s in segments})


def _segments(chosen: dict[str, nn.Parameter], nm: tuple[int, int] | None) -> list[Segment]:
    """The chosen tensors laid end to end; with a pattern, each must have rows that divide by M."""
    segments, offset = [], 0
    for name, param in chosen.items():
        segments.append(Segment(name, param, offset, offset + param.numel()))
        offset += param.numel()
        if nm is not None and (param.dim() < 2 or param[0].numel() % nm[1]):
            raise ValueError(f"pattern '{nm[0]}:{nm[1]}' needs rows whose length divides by {nm[1]}, but {name!r} "
                             f"has rows of {param[0].numel() if param.dim() >= 2 else param.numel()} weights; "
                             f"leave it out with params=")
    return segments


def _plan(settings: PruneSettings, sparsity: float | None, nm: tuple[int, int] | None, segments: list[Segment],
          alive: torch.Tensor) -> list[tuple[list[int] | int | None, tuple[int, int] | None]]:
    """(counts, per_group) of every sub-step, as :func:`~mfac.prune.run.select_keep` takes them."""
    steps = settings.sub_steps(nm)
    if nm is not None:
        return [(None, (math.ceil(nm[0] * j / steps), nm[1])) for j in range(1, steps + 1)]
    if settings.scope == "global":
        return [(c, None) for c in geometric_counts(segments[-1].stop, int((~alive).sum()), sparsity, steps)]
    per_segment = [geometric_counts(s.stop - s.start, int((~alive[s.start: s.stop]).sum()), sparsity, steps)
                   for s in segments]
    return [([counts[j] for counts in per_segment], None) for j in range(steps)]


