"""Compaction: rebuild structurally pruned layers smaller, so the model is smaller and faster.

After structured pruning (``prune_oneshot(..., structure=...)``) the removed neurons, channels and
heads are rows and columns of exact zeros. :func:`compact` slices them out: Linear and convolution
weights and biases, BatchNorm parameters and running statistics, and head counts of attention
modules; the model's outputs are those of the masked model up to float rounding, because every
parameter of a removed structure is zero (so it contributed nothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from .structures import KINDS, StructureGroup, find_structures, structure_coordinates

__all__ = ["compact", "removed_structures", "keep_structures", "shrink_to_state", "CompactionResult"]


@dataclass(frozen=True)
class CompactionResult:
    """What :func:`compact` removed: structures per group name (before -> after)."""

    sizes: dict[str, tuple[int, int]]

    @property
    def removed(self) -> int:
        return sum(before - after for before, after in self.sizes.values())


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return tensors


def removed_structures(model: nn.Module, group: StructureGroup, masks: Mapping | None = None) -> torch.Tensor:
    """(count,) bool: the structures of ``group`` whose every parameter entry is zero in ``model``
    and, where ``masks`` has the parameter, marked pruned. Raises ValueError if ``masks`` marks a
    structure pruned whose weights are not zero (masks not enforced since pruning)."""
    tensors = _tensors(model)
    removed = torch.ones(group.count, dtype=torch.bool)
    marked = torch.ones(group.count, dtype=torch.bool)
    for part in group.params:
        tensor = tensors[part.name].detach()
        index = structure_coordinates(tensor.shape, part, group.count)
        zero = (tensor.reshape(-1)[index.to(tensor.device)] == 0).all(1).cpu()
        removed &= zero
        if masks is not None and part.name in masks:
            pruned = (~masks[part.name].reshape(-1)[index.to(masks[part.name].device)]).all(1).cpu()
            if bool((pruned & ~zero).any()):
                raise ValueError(f"masks mark structures of {group.name!r} as pruned but {part.name!r} is not zero "
                                 f"there: the weights changed since pruning (attach the masks while training, "
                                 f"masks.attach(model), or apply them, masks.apply(model))")
            marked &= pruned
    return removed & marked


def _slice(module: nn.Module, leaf: str, part, kept: torch.Tensor) -> None:
    tensor = getattr(module, leaf)
    index = (kept[:, None] * part.width + torch.arange(part.width)).reshape(-1).to(tensor.device)
    value = tensor.detach().index_select(part.axis, index).clone()
    if isinstance(tensor, nn.Parameter):
        setattr(module, leaf, nn.Parameter(value, requires_grad=tensor.requires_grad))
    else:
        setattr(module, leaf, value)


def _refresh_shape(module: nn.Module) -> None:
    """Make a module's size attributes agree with its (sliced) weights."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels = module.weight.shape[0]
        module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        module.num_features = (module.weight if module.weight is not None else module.running_mean).shape[0]


@torch.no_grad()
def compact(model: nn.Module, masks: Mapping | None = None, groups: list[StructureGroup] | None = None) -> CompactionResult:
    """Slice the removed structures out of ``model``, in place: layers become smaller, outputs stay
    those of the masked model (up to float rounding). A structure is removed when all its
    parameters are zero and, where ``masks`` (from ``prune_oneshot(..., structure=...)``) covers
    them, marked pruned. ``groups``: the structures to consider (default: every neuron, channel and
    head group :func:`~mfac.prune.find_structures` recognises). Every group keeps at least one
    structure. Masks attached for training must be removed first (``handle.remove()``).
    Returns what was removed; optimizers built on the old parameters must be rebuilt."""
    if groups is None:
        groups = find_structures(model, KINDS)
    for group in groups:
        group.check(model)
    parametrized = [name for name, module in model.named_modules() if parametrize.is_parametrized(module)]
    if parametrized:
        raise RuntimeError(f"{parametrized[0]!r} has a mask attached; call handle.remove() before compact()")
    plans = []
    for group in groups:
        removed = removed_structures(model, group, masks)
        if bool(removed.all()):
            removed[0] = False  # a layer is never cut through
        plans.append((group, (~removed).nonzero()[:, 0]))
    for group, kept in plans:
        keep_structures(model, group, kept)
    return CompactionResult({group.name: (group.count, kept.numel()) for group, kept in plans})


@torch.no_grad()
def keep_structures(model: nn.Module, group: StructureGroup, kept: torch.Tensor) -> None:
    """Shrink ``group`` in ``model`` to the structures at indices ``kept`` (sorted, int64), in place:
    slice its parameters and buffers, then fix the modules' size attributes and the group's own."""
    if kept.numel() == group.count:
        return
    touched = {}
    for part in group.params + group.buffers:
        module_name, _, leaf = part.name.rpartition(".")
        module = model.get_submodule(module_name)
        _slice(module, leaf, part, kept.cpu())
        touched[module_name] = module
    for module_name, attribute, per in group.attributes:
        setattr(model.get_submodule(module_name), attribute, kept.numel() * per)
    for module in touched.values():
        _refresh_shape(module)


def shrink_to_state(model: nn.Module, state: Mapping[str, torch.Tensor], kinds=KINDS) -> None:
    """Shrink every structure group of ``kinds`` in ``model`` (as :func:`find_structures` finds
    them in a freshly built model) to the number of structures the tensors of ``state`` hold, in
    place, so that ``model.load_state_dict(state)`` fits: how a compacted model is rebuilt from its
    saved tensors alone. Raises ValueError naming a tensor whose shape is not a smaller layer."""
    for group in find_structures(model, kinds):
        part = group.params[0]
        saved = state.get(part.name)
        if saved is None:
            raise ValueError(f"the saved weights have no tensor {part.name!r}; they do not belong to this model")
        kept = saved.shape[part.axis] // part.width if saved.dim() > part.axis else 0
        if not 1 <= kept <= group.count or kept * part.width != saved.shape[part.axis]:
            raise ValueError(f"{part.name!r} is saved with shape {tuple(saved.shape)}, which is not a smaller "
                             f"{group.kind} layer of this model (it has {group.count})")
        keep_structures(model, group, torch.arange(kept))
