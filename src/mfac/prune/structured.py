"""Structured pruning: remove whole neurons, channels or attention heads, ranked by group OBS.

Each sub-step collects fresh gradients of the weights still alive, builds the (block or exact)
inverse Fisher over every parameter the structures touch, scores each alive structure by its group
OBS saliency rho_Q = 1/2 w_Q^T ([F^-1]_QQ)^-1 w_Q (:mod:`mfac.prune.group_obs`), removes the lowest,
and moves the surviving weights by the group OBS update of their union. ``method="magnitude"`` scores
a structure by the L2 norm of its weights instead and moves nothing. The number of structures
removed falls geometrically over the ``recompute`` sub-steps, as in unstructured OBS. Every group
keeps at least one structure (a layer is never cut through).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .group_obs import Runs, saliencies, update
from .masks import Masks
from .run import GradientSource, PruningRun, Segment, geometric_counts
from .settings import PruneSettings
from .structures import StructureGroup, find_structures, structure_coordinates

__all__ = ["prune_structures", "prune_structured_call"]


class _Layout:
    """The parameters the groups touch, laid end to end, and which coordinates each structure owns."""

    def __init__(self, model: nn.Module, groups: list[StructureGroup]):
        named = dict(model.named_parameters())
        names = list(dict.fromkeys(part.name for group in groups for part in group.params))
        self.segments, offset = [], 0
        for name in names:
            param = named[name]
            self.segments.append(Segment(name, param, offset, offset + param.numel()))
            offset += param.numel()
        starts = {s.name: s.start for s in self.segments}
        coords, owner, self.group_of, first = [], [], [], 0
        for g, group in enumerate(groups):
            for part in group.params:
                index = structure_coordinates(named[part.name].shape, part, group.count) + starts[part.name]
                coords.append(index.reshape(-1))
                owner.append(torch.arange(first, first + group.count).repeat_interleave(index.shape[1]))
            self.group_of += [g] * group.count
            first += group.count
        device = self.segments[0].param.device
        self.coords, self.owner = torch.cat(coords).to(device), torch.cat(owner).to(device)
        self.group_of = torch.tensor(self.group_of, device=device)
        self.count, self.dim, self.groups = first, offset, groups

    def alive_coordinates(self, alive: torch.Tensor) -> torch.Tensor:
        """(d,) bool: coordinates owned by no removed structure."""
        out = torch.ones(self.dim, dtype=torch.bool, device=alive.device)
        out[self.coords[~alive[self.owner]]] = False
        return out

    def alive_structures(self, masks) -> torch.Tensor:
        """(count,) bool: structures not removed by earlier ``masks`` (all of a structure's entries
        pruned in every parameter the masks cover), all alive without masks."""
        alive = torch.ones(self.count, dtype=torch.bool, device=self.coords.device)
        if masks is None:
            return alive
        pruned = torch.ones(self.dim, dtype=torch.bool, device=self.coords.device)
        for s in self.segments:
            if s.name in masks:
                pruned[s.start: s.stop] = ~masks[s.name].reshape(-1).to(pruned.device)
        dead = torch.ones(self.count, dtype=torch.int64, device=alive.device)
        dead = dead.scatter_reduce(0, self.owner, pruned[self.coords].long(), "amin")
        return alive & ~dead.bool()

    def norms(self, weights: torch.Tensor) -> torch.Tensor:
        squares = torch.zeros(self.count, dtype=torch.float64, device=weights.device)
        return squares.index_add_(0, self.owner, weights[self.coords].double().square()).sqrt()


def _pools(layout: _Layout, scope: str) -> torch.Tensor:
    """Which ranking pool each group is in: one pool per kind (neurons compete with neurons across
    layers, heads with heads), or one per group with ``scope="layer"``."""
    if scope == "layer":
        return torch.arange(len(layout.groups))
    kinds = list(dict.fromkeys(group.kind for group in layout.groups))
    return torch.tensor([kinds.index(group.kind) for group in layout.groups])


def _plan(layout: _Layout, settings: PruneSettings, sparsity: float, pools: torch.Tensor,
          alive: torch.Tensor) -> list[torch.Tensor]:
    """Structures removed per pool after each sub-step, (pools,) int64 each, falling geometrically
    from those removed already."""
    steps = settings.sub_steps()
    pool_of = pools.to(alive.device)[layout.group_of]
    sizes = torch.zeros(int(pools.max()) + 1, dtype=torch.int64).index_add_(
        0, pools, torch.tensor([group.count for group in layout.groups]))
    removed = torch.zeros_like(sizes).index_add_(0, pool_of.cpu(), (~alive).long().cpu())
    per_pool = [geometric_counts(int(size), int(done), sparsity, steps) for size, done in zip(sizes, removed)]
    return [torch.tensor([counts[j] for counts in per_pool]) for j in range(steps)]


def _choose(scores: torch.Tensor, alive: torch.Tensor, layout: _Layout, pool_of: torch.Tensor,
            target: torch.Tensor) -> torch.Tensor:
    """New alive mask: in each pool, remove the lowest-scoring alive structures until ``target`` of
    the pool's are removed, keeping each group's best one."""
    scores = scores.masked_fill(~alive, -math.inf)
    best = torch.full((len(layout.groups),), -math.inf, dtype=scores.dtype, device=scores.device)
    best = best.scatter_reduce(0, layout.group_of, scores, "amax")
    candidates = scores.masked_fill((scores == best[layout.group_of]) | ~alive, math.inf)
    new_alive = alive.clone()
    for pool in range(target.numel()):
        members = (pool_of == pool).nonzero()[:, 0]
        extra = int(target[pool]) - int((~alive[members]).sum())
        allowed = int((candidates[members] < math.inf).sum())
        if extra > 0:
            order = members[torch.argsort(candidates[members], stable=True)]
            new_alive[order[: min(extra, allowed)]] = False
    return new_alive


@torch.no_grad()
def prune_structures(model: nn.Module, settings: PruneSettings, sparsity: float, groups: list[StructureGroup],
                     source: GradientSource | None = None, callback=None, masks=None) -> Masks:
    """Remove ``sparsity`` of the structures of ``groups`` (ranked across layers within each kind, or
    the same fraction in every group with ``settings.scope == "layer"``), in place; returns parameter masks (True = kept)
    of every parameter the groups touch. Weights of removed structures are exactly zero; with OBS the
    others have moved to compensate. Structures that earlier ``masks`` removed stay removed and count
    towards ``sparsity``. An error while pruning restores the original weights."""
    for group in groups:
        group.check(model)
    layout = _Layout(model, groups)
    run = PruningRun(model, layout.segments, settings, source)
    original = torch.cat([s.param.detach().reshape(-1) for s in layout.segments])
    weights, alive = original.clone(), layout.alive_structures(masks)
    pools = _pools(layout, settings.scope)
    pool_of = pools.to(alive.device)[layout.group_of]
    plan = _plan(layout, settings, sparsity, pools, alive)
    runs = None
    try:
        for done, target in enumerate(plan, start=1):
            coordinates = layout.alive_coordinates(alive)
            if settings.method == "obs":
                finv = run.inverse(coordinates)
                runs = runs if runs is not None and runs.block_size == finv.block_size else \
                    Runs(layout.coords, layout.owner, finv.block_size)
                scores = saliencies(finv, weights, runs, layout.count)
            else:
                scores = layout.norms(weights)
            new_alive = _choose(scores, alive, layout, pool_of, target)
            now = layout.alive_coordinates(new_alive)
            if settings.method == "obs":
                weights = weights + update(finv, weights, coordinates & ~now)
            weights = weights.masked_fill(~now, 0.0)
            run.write(weights)
            alive = new_alive
            if callback is not None:
                callback(done, len(plan), 1.0 - float(alive.float().mean()))
    except BaseException:
        run.write(original)
        raise
    coordinates = layout.alive_coordinates(alive)
    return Masks({s.name: coordinates[s.start: s.stop].reshape(s.param.shape).clone() for s in layout.segments})


def prune_structured_call(model, settings, sparsity, nm, source, structure, groups, params, masks, callback) -> Masks:
    """``prune_oneshot`` with ``structure=`` or ``groups=``: checks what structured pruning cannot take."""
    if structure is not None and groups is not None:
        raise ValueError("pass structure= (to find the structures) or groups= (to give them), not both")
    if nm is not None:
        raise ValueError("pattern= (N:M sparsity inside rows) cannot be combined with structure=; leave one out")
    if params is not None:
        raise ValueError("structure= chooses the parameters itself: leave params= out")
    if groups is None:
        groups = find_structures(model, structure)
    elif not isinstance(groups, (list, tuple)) or not all(isinstance(g, StructureGroup) for g in groups) \
            or not groups:
        raise TypeError("groups must be a non-empty list of mfac.prune.StructureGroup")
    return prune_structures(model, settings, sparsity, list(groups), source, callback, masks)
