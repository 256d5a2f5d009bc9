"""Gradual pruning on the Zhu & Gupta cubic schedule, interleaved with training."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields, replace

import torch
from torch import nn

from .. import defaults
from ..progress import pruning_hooks
from .masks import MaskHandle, Masks
from .oneshot import GradientSource, prune, resolve_params
from .settings import PruneSettings
from .structured import prune_structures
from .structures import StructureGroup, find_structures, structure_coordinates

__all__ = ["GradualPruner", "check_schedule"]

SETTINGS = tuple(field.name for field in fields(PruneSettings) if field.name != "method")


def check_schedule(final_sparsity, start_step, end_step, every, schedule="cubic", initial_sparsity=0.0) -> None:
    """Validate a pruning schedule's settings; raises ValueError naming the argument."""
    for name, value in (("start_step", start_step), ("end_step", end_step), ("every", every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "every" else 0):
            raise ValueError(f"{name} must be a non-negative int (every >= 1), got {value!r}")
    if end_step < start_step:
        raise ValueError(f"end_step ({end_step}) must not come before start_step ({start_step})")
    for name, value in (("final_sparsity", final_sparsity), ("initial_sparsity", initial_sparsity)):
        if not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if initial_sparsity > final_sparsity:
        raise ValueError("initial_sparsity must not exceed final_sparsity")
    if schedule not in ("cubic", "linear"):
        raise ValueError(f"schedule must be 'cubic' or 'linear', got {schedule!r}")


class GradualPruner:
    """Prune a model step by step while it trains: call ``step()`` once after every
    ``optimizer.step()``.

    At steps start_step, start_step + every, ..., up to end_step, the sparsity target is

        s(t) = final + (initial - final) * (1 - (t - start_step) / (end_step - start_step))^3

    (``schedule="cubic"``; ``"linear"`` uses a first power), and the model is pruned to it as by
    :func:`~mfac.prune.prune_oneshot`, with ``method`` and its settings (``num_grads``, ``damp``,
    ``relative_damp``, ``block_size``, ``recompute``, ``per_sample``, ``scope``; ``None`` or left out:
    the default, which for ``recompute`` is ``mfac.defaults.GRADUAL_RECOMPUTE`` = 1 here), or a
    checked :class:`~mfac.prune.settings.PruneSettings` as ``settings=``; and its ``params``,
    ``callback``, ``on_gradient_rows`` and ``process_group``. Settings are checked here, once.
    Between pruning steps the masks stay attached, so pruned weights are exactly zero throughout.

    Structured: with ``structure="neurons" | "channels" | "heads"`` (or a tuple of them, found by
    :func:`~mfac.prune.find_structures` when the pruner is built), or ``groups=`` (a list of
    :class:`~mfac.prune.StructureGroup`), every pruning step removes whole structures as
    ``prune_oneshot(..., structure=...)`` does (group OBS, or the L2 norm with ``method="magnitude"``):
    the schedule's sparsity is then the fraction of structures removed (per kind across layers, or
    in every layer with ``scope="layer"``), structures removed at earlier steps stay removed and
    count toward it, and the masks cover every parameter the structures touch (weights and biases
    of both layers), attached between steps as above, so removed structures stay exactly zero and
    :func:`~mfac.prune.compact` can slice them out after training. ``params`` and ``pattern`` do not
    combine with it. A pruning step whose target removes no further structure (the count, rounded,
    is reached already) is skipped, gradients and all.

    Args:
        model: the model being trained (pruned in place).
        final_sparsity: target at ``end_step``, in [0, 1).
        start_step, end_step, every: the pruning steps (counting calls to ``step()`` from 1).
        data, loss_fn: batches and loss for OBS gradients (cycled; not needed for magnitude); or
            ``batch_loss(model, batch)`` instead of ``loss_fn`` for batches of any structure.
        structure, groups: prune whole structures (see above); checked here, when the pruner is built.
        progress: show the progress of each pruning step on stderr (default False), as
            ``prune_oneshot(progress=True)`` does: a tqdm bar when tqdm is installed and stderr is a
            terminal, otherwise a few plain lines per pruning step ("GradualPruner step t -> s%, gradients: ...");
            OBS counts the gradient rows. ``callback`` and ``on_gradient_rows`` are still called.
    """

    def __init__(self, model: nn.Module, final_sparsity: float, start_step: int, end_step: int, every: int,
                 data: Iterable | None = None, loss_fn=None, method: str = "obs", schedule: str = "cubic",
                 initial_sparsity: float = 0.0, *, batch_loss=None, settings: PruneSettings | None = None,
                 params=None, callback=None, on_gradient_rows=None, process_group=None, structure=None,
                 groups=None, progress: bool = False, **setting_kwargs):
        check_schedule(final_sparsity, start_step, end_step, every, schedule, initial_sparsity)
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be True or False, got {progress!r}")
        self.progress = progress
        structured = structure is not None or groups is not None
        self.settings = _gradual_settings(method, settings, setting_kwargs, structured)
        self.groups = _structure_groups(model, structure, groups, params)
        self._source = GradientSource.of(self.settings, data, loss_fn, batch_loss, process_group, on_gradient_rows)
        self.model = model
        self.final_sparsity, self.initial_sparsity = float(final_sparsity), float(initial_sparsity)
        self.start_step, self.end_step, self.every = start_step, end_step, every
        self.schedule, self.method, self.loss_fn, self.batch_loss = schedule, method, loss_fn, batch_loss
        self._callback = callback
        if self.groups is None:
            self._names = list(resolve_params(model, params))
        else:
            self._names = list(dict.fromkeys(part.name for group in self.groups for part in group.params))
        self.masks = Masks.dense({n: p for n, p in resolve_params(model, self._names).items()})
        self._handle: MaskHandle | None = None
        self._step = 0
        self._removed_cache: tuple[Masks | None, list[torch.Tensor]] = (None, [])

    @property
    def current_step(self) -> int:
        return self._step

    @property
    def structured(self) -> bool:
        """Whether whole structures are pruned (``structure=`` or ``groups=``)."""
        return self.groups is not None

    @property
    def sparsity(self) -> float:
        """What the schedule counts, now: the fraction of pruned entries of the pruned tensors, or with
        ``structure=``/``groups=`` the fraction of structures removed (over all groups)."""
        if self.groups is None:
            return self.masks.sparsity()
        removed = self.removed_structures()
        return sum(int(r.sum()) for r in removed) / sum(r.numel() for r in removed)

    def removed_structures(self) -> list[torch.Tensor]:
        """Structured pruning only: for each group of :attr:`groups`, a (count,) bool tensor of the
        structures removed so far (every entry they own pruned in the masks)."""
        if self.groups is None:
            raise RuntimeError("removed_structures() is for structured pruning (structure= or groups=)")
        masks, removed = self._removed_cache
        if masks is not self.masks:  # masks change only by being replaced: count once per new masks
            removed = [_removed(group, self.masks) for group in self.groups]
            self._removed_cache = (self.masks, removed)
        return [r.clone() for r in removed]

    def target_sparsity(self, step: int) -> float:
        """The schedule's sparsity for ``step`` (0 before start_step, final after end_step)."""
        if step < self.start_step:
            return 0.0
        if step >= self.end_step:
            return self.final_sparsity
        progress = (step - self.start_step) / (self.end_step - self.start_step)
        power = 3 if self.schedule == "cubic" else 1
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1 - progress) ** power

    def _is_pruning_step(self, step: int) -> bool:
        return self.start_step <= step <= self.end_step and (
            (step - self.start_step) % self.every == 0 or step == self.end_step)

    def step(self) -> bool:
        """Advance one training step; prune if the schedule says so. Returns True if it pruned."""
        self._step += 1
        if not self._is_pruning_step(self._step):
            return False
        target = self.target_sparsity(self._step)
        if not self._removes_more(target):
            return False
        self.detach()
        try:
            self.masks = self._prune_with_progress(target) if self.progress else \
                self._prune(target, self._source, self._callback)
        finally:
            self._handle = self.masks.attach(self.model)
        return True

    def _prune(self, target: float, source, callback) -> Masks:
        """One pruning step to ``target`` (single weights, or whole structures)."""
        if self.groups is None:
            return prune(self.model, self.settings, target, source=source, params=self._names, masks=self.masks,
                         callback=callback)
        return prune_structures(self.model, self.settings, target, self.groups, source, callback, self.masks)

    def _prune_with_progress(self, target: float) -> Masks:
        """:meth:`_prune` with :func:`mfac.progress.pruning_hooks` (``progress=True``), one bar per step."""
        source = self._source
        rows = self.settings.num_grads if source is None or source.sharing is None else source.sharing.rows
        desc = f"GradualPruner step {self._step} -> {target:.1%}"
        with pruning_hooks(self.settings.method, self.settings.sub_steps(), rows, desc, callback=self._callback,
                           on_gradient_rows=None if source is None else source.on_rows) as hooks:
            if source is not None:  # the same batches (cycled on), with the bar's row counter
                source = replace(source, on_rows=hooks["on_gradient_rows"])
            return self._prune(target, source, hooks["callback"])

    def _removes_more(self, target: float) -> bool:
        """Whether pruning to ``target`` removes anything: more weights than now, or (structured) more
        structures in some ranking pool (one per kind, or one per group with scope="layer") than the
        pool has removed already, as :func:`~mfac.prune.structured.prune_structures` counts them."""
        if self.groups is None:
            return target > self.masks.sparsity() + 1e-12
        pools: dict = {}
        for index, (group, removed) in enumerate(zip(self.groups, self.removed_structures())):
            key = index if self.settings.scope == "layer" else group.kind
            size, done = pools.get(key, (0, 0))
            pools[key] = (size + group.count, done + int(removed.sum()))
        return any(round(target * size) > done for size, done in pools.values())

    def detach(self) -> None:
        """Remove the masks from the model (pruned weights stay zero); ``step()`` re-attaches them."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _schedule(self) -> dict:
        schedule = {"final_sparsity": self.final_sparsity, "initial_sparsity": self.initial_sparsity,
                    "start_step": self.start_step, "end_step": self.end_step, "every": self.every,
                    "schedule": self.schedule}
        if self.groups is not None:  # only then: states saved by unstructured pruners load as before
            schedule["structures"] = describe_groups(self.groups)
        return schedule

    def state_dict(self) -> dict:
        """The schedule position, the masks and the schedule's settings (checked on load)."""
        return {"step": self._step, "masks": self.masks.state_dict(), "schedule": self._schedule()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the step counter and masks, and attach the masks to the model. Checked first
        (keys, step, mask names and shapes against the pruned parameters, the schedule's settings);
        a failed load raises ValueError and changes nothing."""
        if not isinstance(state, dict) or not {"step", "masks"} <= set(state):
            raise ValueError("pruner state must be a dict with 'step' and 'masks'; pass the output of state_dict()")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"pruner state's step must be an int >= 0, got {step!r}")
        saved_schedule = state.get("schedule")
        if saved_schedule is not None and saved_schedule != self._schedule():
            mine = self._schedule()
            differences = {k: (saved_schedule.get(k), mine.get(k)) for k in {**saved_schedule, **mine}
                           if saved_schedule.get(k) != mine.get(k)}
            raise ValueError(f"pruner state was saved with another schedule (saved, this pruner): {differences}; "
                             f"construct the GradualPruner with the same settings to resume")
        masks = Masks.dense(resolve_params(self.model, self._names))
        try:
            masks.load_state_dict(state["masks"])
        except TypeError as error:
            raise ValueError(f"pruner state's masks: {error}") from None
        self.detach()
        self.masks = masks
        self._step = step
        if self.masks.sparsity() > 0:
            self._handle = self.masks.attach(self.model)


def describe_groups(groups: list[StructureGroup]) -> list[list]:
    """[kind, name, count] of each group: what a saved pruning state records of its structures, so
    a resume with other structures is refused."""
    return [[group.kind, group.name, group.count] for group in groups]


def _structure_groups(model: nn.Module, structure, groups, params) -> list[StructureGroup] | None:
    """The structure groups to prune (None: unstructured), checked against the model; raises
    ValueError/TypeError naming the argument."""
    if structure is None and groups is None:
        return None
    if structure is not None and groups is not None:
        raise ValueError("pass structure= (to find the structures) or groups= (to give them), not both")
    if params is not None:
        raise ValueError("structure= (or groups=) chooses the parameters itself: leave params= out")
    if groups is None:
        groups = find_structures(model, structure)
    elif not isinstance(groups, (list, tuple)) or not groups or not all(isinstance(g, StructureGroup) for g in groups):
        raise TypeError("groups must be a non-empty list of mfac.prune.StructureGroup")
    groups = list(groups)
    for group in groups:
        group.check(model)
    return groups


def _removed(group: StructureGroup, masks: Masks) -> torch.Tensor:
    """(count,) bool: structures of ``group`` whose every entry is pruned in every parameter the masks
    cover (how :func:`~mfac.prune.structured.prune_structures` reads earlier masks)."""
    removed = torch.ones(group.count, dtype=torch.bool)
    for part in group.params:
        if part.name in masks:
            mask = masks[part.name]
            index = structure_coordinates(mask.shape, part, group.count).to(mask.device)
            removed &= (~mask.reshape(-1)[index]).all(1).cpu()
    return removed


def _gradual_settings(method: str, settings: PruneSettings | None, given: dict,
                      structured: bool = False) -> PruneSettings:
    """The pruner's settings: ``settings`` as given (checked already), or built from the keyword
    arguments with ``recompute`` defaulting to ``mfac.defaults.GRADUAL_RECOMPUTE``."""
    unknown = sorted(set(given) - set(SETTINGS))
    if unknown:
        hint = ""
        if "pattern" in unknown:
            hint = "; pattern= (N:M inside rows) cannot be combined with structure=" if structured else \
                "; it prunes to its schedule's sparsity, so pattern= is prune_oneshot's only"
        raise TypeError(f"GradualPruner got unexpected keyword arguments {unknown}{hint}; it takes the settings "
                        f"{', '.join(SETTINGS)} (or settings=), and params, callback, on_gradient_rows, process_group, "
                        f"progress")
    if settings is None:
        if given.get("recompute") is None:
            given = {**given, "recompute": defaults.GRADUAL_RECOMPUTE}
        return PruneSettings(method=method, **given)
    if not isinstance(settings, PruneSettings):
        raise TypeError(f"settings must be a mfac.prune.settings.PruneSettings, got {type(settings).__name__}")
    if given:
        raise TypeError(f"pass either settings= or the individual settings ({', '.join(sorted(given))}), not both")
    if settings.method != method:
        raise ValueError(f"method={method!r} contradicts settings.method={settings.method!r}; pass the same method")
    return settings
