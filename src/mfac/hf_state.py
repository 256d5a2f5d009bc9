"""The saved state of :class:`mfac.hf.PruningCallback` and the batches of its pruning steps.

* :func:`write_state` / :func:`read_state`: ``mfac_pruning.safetensors`` (the masks) and
  ``mfac_pruning.json`` (the schedule position and settings) in a checkpoint folder, each written
  atomically; an unreadable file is refused with an error that names it.
* :func:`masks_from_weights`: the masks rebuilt from the model's own weights (pruned weights are
  exactly zero), for a checkpoint whose state files are missing.
* :func:`resumed_folder`: the folder ``Trainer.train(resume_from_checkpoint=...)`` resumes from.
* :class:`StepBatches`: batches that are a deterministic function of (seed, training step), so a
  resumed run prunes on the same batches as an uninterrupted one.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CorruptFileError, atomic_write_bytes, load_weights, save_weights

__all__ = ["STATE_FILE", "SCHEDULE_FILE", "StateFileError", "write_state", "read_state", "has_state",
           "masks_from_weights", "resumed_folder", "StepBatches"]

STATE_FILE = "mfac_pruning.safetensors"  # the masks, in each checkpoint folder
SCHEDULE_FILE = "mfac_pruning.json"  # the schedule position and settings


class StateFileError(ValueError):
    """A pruning state file that exists but cannot be read (half-written, truncated, edited)."""


def write_state(folder: Path, step: int, schedule: dict, masks) -> None:
    """Write the masks, then the schedule file, each atomically: a kill leaves the old file or the new."""
    save_weights({name: mask for name, mask in masks.items()}, folder / STATE_FILE)
    text = json.dumps({"step": step, "schedule": schedule, "params": list(masks)}, indent=1)
    atomic_write_bytes(folder / SCHEDULE_FILE, text.encode())


def has_state(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file() or (folder / SCHEDULE_FILE).is_file()


def _unreadable(path: Path, error: Exception) -> StateFileError:
    return StateFileError(f"PruningCallback state file {path} is unreadable ({type(error).__name__}: {error}); it was "
                          f"probably cut short by a kill or a full disk. Delete {path.parent / STATE_FILE} and "
                          f"{path.parent / SCHEDULE_FILE} to resume with the state rebuilt from the checkpoint's "
                          f"weights, or resume from another checkpoint")


def read_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the schedule file's dict, name -> bool mask) from ``folder``; FileNotFoundError naming the
    missing file, :class:`StateFileError` naming an unreadable one."""
    schedule_file, masks_file = folder / SCHEDULE_FILE, folder / STATE_FILE
    for path in (schedule_file, masks_file):
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {path.name}: the PruningCallback state there is incomplete")
    try:
        saved = json.loads(schedule_file.read_text())
        if not isinstance(saved, dict) or not isinstance(saved.get("step"), int):
            raise ValueError("not a dict with an int 'step'")
    except (ValueError, UnicodeDecodeError) as error:
        raise _unreadable(schedule_file, error) from None
    try:
        masks = {name: tensor.bool() for name, tensor in load_weights(masks_file).items()}
    except (CorruptFileError, OSError, ValueError) as error:
        raise _unreadable(masks_file, error) from None
    return saved, masks


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_buffers()), **dict(model.named_parameters())}


def masks_from_weights(model: nn.Module, names, groups, pruned: bool) -> dict[str, torch.Tensor]:
    """Masks over ``names`` read off the weights: ``weight != 0`` (unstructured), or with ``groups``
    every structure whose entries are all zero removed. ``pruned=False`` (no pruning step yet): dense."""
    tensors = _tensors(model)
    masks = {name: torch.ones_like(tensors[name], dtype=torch.bool) for name in names}
    if not pruned:
        return masks
    if groups is None:
        return {name: tensors[name].detach() != 0 for name in names}
    for group in groups:
        zero = torch.ones(group.count, dtype=torch.bool, device=tensors[group.params[0].name].device)
        for part in group.params:
            values = tensors[part.name].detach().movedim(part.axis, 0).reshape(group.count, -1)
            zero &= (values == 0).all(1).to(zero.device)
        rows = torch.nonzero(zero).squeeze(1)
        for part in group.params:
            index = (rows[:, None] * part.width + torch.arange(part.width, device=rows.device)).reshape(-1)
            masks[part.name].index_fill_(part.axis, index.to(masks[part.name].device), False)
    return masks


def resumed_folder() -> Path | None:
    """The checkpoint folder the running ``Trainer.train`` resumes from (its ``resume_from_checkpoint``,
    already resolved from True to the last checkpoint), read from Trainer's frame on the stack; None
    when not called from inside ``Trainer.train`` or when Trainer keeps it elsewhere."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            local = frame.f_locals
            folder = local.get("resume_from_checkpoint")
            if isinstance(folder, (str, Path)) and type(local.get("self")).__name__.endswith("Trainer"):
                return Path(folder)
            frame = frame.f_back
        return None
    finally:
        del frame


class StepBatches:
    """A re-iterable of batches for OBS gradients whose one endless iterator draws, at each training
    step, from a fresh ``torch.Generator`` seeded from ``seed`` and :attr:`step`: the batches of a
    pruning step depend on (seed, step) only, not on what was drawn before or on whether the run
    was interrupted. The global random state is left untouched.

    ``data`` a DataLoader over a map-style dataset: samples drawn without replacement (reshuffled
    when used up) in batches of its batch size, put together by its ``collate_fn``; a list or tuple
    of batches: its batches in a random order; any other re-iterable: iterated from its beginning at
    each step (deterministic when its iteration is)."""

    def __init__(self, data, seed: int):
        self.data, self.seed, self.step = data, int(seed), 0
        dataset, collate = getattr(data, "dataset", None), getattr(data, "collate_fn", None)
        size = getattr(data, "batch_size", None) or getattr(getattr(data, "batch_sampler", None), "batch_size", None)
        self.sampled = (dataset is not None and callable(collate) and isinstance(size, int) and size > 0
                        and not isinstance(dataset, torch.utils.data.IterableDataset)
                        and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") and len(dataset) > 0)
        self.batch_size = size if self.sampled else None

    def generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) % (1 << 63))

    def _stream(self, generator: torch.Generator):
        if self.sampled:
            dataset, size = self.data.dataset, self.batch_size
            while True:
                order = torch.randperm(len(dataset), generator=generator).tolist()
                for start in range(0, len(order), size):
                    yield self.data.collate_fn([dataset[i] for i in order[start: start + size]])
        elif isinstance(self.data, Sequence) and len(self.data) > 0:
            while True:
                for i in torch.randperm(len(self.data), generator=generator).tolist():
                    yield self.data[i]
        else:
            while True:
                empty = True
                for batch in self.data:
                    empty = False
                    yield batch
                if empty:
                    raise ValueError("data yielded no batches; pass a non-empty iterable of batches")

    def __iter__(self):
        while True:
            step = self.step
            for batch in self._stream(self.generator(step)):
                yield batch
                if self.step != step:  # a new training step: a new stream
                    break
