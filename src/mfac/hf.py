"""Hugging Face Transformers integration: gradual OBS or magnitude pruning inside ``Trainer``.

Needs the ``[hf]`` extra (``pip install "mfac-torch[hf]"``); the rest of mfac imports without it.

* :class:`PruningCallback`: a ``TrainerCallback`` that prunes on the cubic (or linear) schedule of
  :class:`mfac.prune.GradualPruner` while ``Trainer`` trains, keeps pruned weights exactly zero after
  every optimizer step, logs the sparsity, saves its state in every checkpoint and restores it on
  ``trainer.train(resume_from_checkpoint=...)``. With ``structure="neurons" | "heads"`` it removes
  whole feed-forward neurons or attention heads instead, and at the end of training saves the
  compacted (smaller) model to ``<output_dir>/compacted``.
* :func:`default_pruning_params`: the weights it prunes by default.

``mfac.MFAC`` itself needs nothing from here: pass it to ``Trainer`` as
``optimizers=(MFAC(model.parameters(), lr=...), None)`` or
``optimizer_cls_and_kwargs=(MFAC, {"lr": ..., ...})``; its state loads with ``weights_only=True``,
as Trainer loads it when resuming.

Example::

    from mfac.hf import PruningCallback
    trainer = Trainer(model, args, train_dataset=train, data_collator=collator,
                      callbacks=[PruningCallback(0.8, start_step=100, end_step=900, every=100)])
    trainer.train()
    model.save_pretrained("pruned")   # a plain model with zeros in place

Structured, the smaller model saved at the end::

    callback = PruningCallback(0.5, start_step=100, end_step=900, every=100, structure="heads")
    Trainer(model, args, ..., callbacks=[callback]).train()
    small = mfac.hf_compact.load_compacted(callback.compacted_folder)   # <output_dir>/compacted
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from . import defaults
from .hf_state import STATE_FILE, SCHEDULE_FILE, StepBatches, has_state, masks_from_weights, read_state, \
    resumed_folder, write_state
from .prune.compact import compact
from .prune.gradual import GradualPruner, check_schedule, describe_groups
from .prune.settings import PruneSettings
from .prune.structures import KINDS, StructureGroup, find_structures

__all__ = ["PruningCallback", "default_pruning_params", "STATE_FILE", "SCHEDULE_FILE"]

COMPACTED_DIR = "compacted"  # under args.output_dir: the compacted model saved at the end of training


def _is_dense_layer(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a Linear with a transposed weight.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def default_pruning_params(model: nn.Module) -> list[str]:
    """Names of the weights of every Linear layer (or GPT-2-style Conv1D) inside the model's stack of
    repeated blocks, that is inside an ``nn.ModuleList`` of ``model.base_model``: the attention and
    feed-forward weights of every encoder or decoder layer. Embeddings, the pooler and the task head
    are left dense. Raises ValueError when the model has no such layers."""
    base = getattr(model, "base_model", model)
    prefix = next((name + "." for name, module in model.named_modules() if module is base and name), "")
    names = []
    for list_name, block_list in base.named_modules():
        if not isinstance(block_list, nn.ModuleList):
            continue
        for name, module in block_list.named_modules():
            if _is_dense_layer(module) and name:
                full = f"{prefix}{list_name}.{name}.weight"
                if full not in names:
                    names.append(full)
    if not names:
        raise ValueError("params: found no Linear layers inside a stack of repeated blocks (an nn.ModuleList of "
                         "model.base_model); pass params=[names of the weights to prune]")
    return names


def _model_loss(model, batch):
    return model(**batch).loss


class PruningCallback(TrainerCallback):
    """Gradual pruning during ``Trainer.train``: at steps start_step, start_step + every, ..., end_step
    the chosen weights are pruned to the schedule's sparsity (see :class:`mfac.prune.GradualPruner`
    for the schedule) by OBS over fresh gradients or by magnitude.

    Args:
        final_sparsity: fraction of the chosen weights removed at ``end_step``, in [0, 1).
        start_step, end_step, every: pruning steps, counted in optimizer steps (Trainer's global_step).
        method: "obs" (default) or "magnitude".
        schedule, initial_sparsity: "cubic" (default) or "linear"; the sparsity at start_step.
        params: names of the weights to prune; default :func:`default_pruning_params`.
        data: batches for OBS gradients; default the Trainer's train dataloader.
        batch_loss: ``batch_loss(model, batch)`` -> mean loss; default the model's own loss,
            ``model(**batch).loss``.
        num_grads, block_size, recompute, per_sample, damp, relative_damp, scope: as for
            :func:`mfac.prune.prune_oneshot`; ``None`` means the default, here
            ``mfac.defaults.GRADUAL_NUM_GRADS`` (64) per-sample gradients, blocks of
            ``PRUNE_BLOCK_SIZE`` (128; ``mfac.defaults.EXACT`` for the exact inverse),
            ``GRADUAL_RECOMPUTE`` (1) recomputation, relative damping (``PRUNE_RELATIVE_DAMP``).
            Checked here, when the callback is made.
        resume_from: the checkpoint folder to restore the pruning state from when training resumes;
            default the folder given to ``trainer.train(resume_from_checkpoint=...)`` (wherever it
            lives), else ``<output_dir>/checkpoint-<global_step>``. A folder without the state files
            (or with masks that do not match its weights) resumes with the state rebuilt from the
            weights Trainer loaded, with a warning: pruned weights are exactly zero, and the schedule
            position is Trainer's ``global_step``.
        seed: base seed of the OBS gradient batches (default Trainer's ``args.seed``): the batches of
            each pruning step are drawn with a ``torch.Generator`` seeded from it and the step, from
            the dataset of ``data`` (a DataLoader; its batch size and ``collate_fn``), so a resumed run
            prunes on the same batches, and ends with the same masks and weights, as an
            uninterrupted one. See :class:`mfac.hf_state.StepBatches`.
        structure: remove whole structures instead of single weights: ``"neurons"`` (the
            feed-forward neurons of every encoder layer), ``"heads"`` (attention heads), or both as a
            tuple, found by :func:`mfac.prune.find_structures` in BERT-family encoders (BERT, MiniLM,
            RoBERTa, DistilBERT, ...) when training begins; ``"channels"`` for CNNs. The schedule's
            sparsity is then the fraction of structures removed (per kind across layers, or the same
            fraction in every layer with ``scope="layer"``), by group OBS or, with
            ``method="magnitude"``, the L2 norm of each structure's weights; structures removed at
            one step stay removed. ``params`` does not combine with it.
        groups: instead of ``structure``, the structures as a list of :class:`mfac.prune.StructureGroup`.
        compact_at_end: at the end of training, slice the removed structures out of a copy of the
            model (:func:`mfac.prune.compact`) and save it with :func:`mfac.hf_compact.save_compacted`
            (and the Trainer's tokenizer, if it has one) to ``<output_dir>/compacted``, on the process
            that saves. Default (None): True with ``structure``/``groups``; True without them is an
            error. The folder loads with :func:`mfac.hf_compact.load_compacted` (always), or with
            plain ``from_pretrained`` when :attr:`compacted_format` is ``"transformers"`` (the same
            number of neurons in every layer, ``scope="layer"``, and no head removed). It needs a
            BERT-family encoder (checked when training begins); for other models pass False and call
            :func:`mfac.prune.compact` yourself.

    Between pruning steps the gradients of pruned weights are zeroed before each optimizer step
    and the weights are zeroed after it, so they are exactly zero after every step with any
    optimizer, and the model stays a plain model: Trainer's checkpoints and ``save_pretrained`` hold
    ordinary weights with zeros in place. The sparsity goes into each log entry as ``sparsity``.
    Each checkpoint folder gets ``mfac_pruning.safetensors`` (the masks) and ``mfac_pruning.json``
    (the schedule position and settings, checked on resume), each written atomically; an unreadable
    one is refused naming the file.

    With ``structure``, the masks cover every parameter the structures touch (both layers' weights,
    and biases), removed structures stay exactly zero through every optimizer step as above, and
    the in-memory model stays the full-size model with those zeros (the model Trainer, its optimizer
    and any later ``trainer.evaluate()`` or ``trainer.save_model()`` work on): compaction at the end
    works on a copy, so the smaller model costs one extra copy of the weights for the moment it is
    built. After training, :attr:`compacted_folder` is where it went, :attr:`compacted_format`
    what loads it ("transformers" or "mfac") and :attr:`compaction` the sizes before and after.
    """

    def __init__(self, final_sparsity: float, start_step: int, end_step: int, every: int, method: str = "obs",
                 schedule: str = "cubic", initial_sparsity: float = 0.0, params=None, data=None, batch_loss=None,
                 num_grads: int | None = None, block_size: int | str | None = None, recompute: int | None = None,
                 per_sample: bool = True, damp: float | None = None, relative_damp: float | None = None,
                 scope: str = "global", resume_from: str | os.PathLike | None = None, *, structure=None,
                 groups=None, compact_at_end: bool | None = None, seed: int | None = None):
        check_schedule(final_sparsity, start_step, end_step, every, schedule, initial_sparsity)
        self.structure, self.groups = _check_structure(structure, groups, params)
        structured = self.structure is not None or self.groups is not None
        if compact_at_end is not None and not isinstance(compact_at_end, bool):
            raise ValueError(f"compact_at_end must be True, False or None, got {compact_at_end!r}")
        if compact_at_end and not structured:
            raise ValueError("compact_at_end=True needs structure= (or groups=): only removed structures can be "
                             "sliced out; unstructured zeros stay in dense tensors")
        self.compact_at_end = structured if compact_at_end is None else compact_at_end
        self.settings = PruneSettings(
            method=method, num_grads=defaults.GRADUAL_NUM_GRADS if num_grads is None else num_grads,
            block_size=block_size, recompute=defaults.GRADUAL_RECOMPUTE if recompute is None else recompute,
            per_sample=per_sample, scope=scope, damp=damp, relative_damp=relative_damp)
        if batch_loss is not None and not callable(batch_loss):
            raise TypeError(f"batch_loss must be callable, got {type(batch_loss).__name__}")
        self.schedule = dict(final_sparsity=final_sparsity, start_step=start_step, end_step=end_step, every=every,
                             method=method, schedule=schedule, initial_sparsity=initial_sparsity)
        if self.groups is not None:  # only when structured: checkpoints of unstructured runs resume as before
            self.schedule["structures"] = describe_groups(self.groups)
        elif self.structure is not None:
            self.schedule["structure"] = list(self.structure)
        self.params, self.data, self.batch_loss = params, data, batch_loss
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None (Trainer's args.seed), got {seed!r}")
        self.resume_from, self.seed = resume_from, seed
        self._batches: StepBatches | None = None
        self.pruner: GradualPruner | None = None
        self._model: nn.Module | None = None
        self._pruned = False  # whether any mask has a pruned entry (kept, not recounted every step)
        self.compacted_folder: Path | None = None
        self.compacted_format: str | None = None
        self.compaction = None

    @property
    def sparsity(self) -> float:
        """Sparsity now (0 before training starts): the fraction of the pruned weights, or with
        ``structure``/``groups`` the fraction of structures removed."""
        return self.pruner.sparsity if self.pruner is not None else 0.0

    # -- Trainer events ---------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if model is None:
            raise RuntimeError("PruningCallback needs the model; use it as a Trainer callback")
        method = self.schedule["method"]
        data = self.data if self.data is not None else train_dataloader
        if method == "obs" and data is None:
            raise ValueError("PruningCallback(method='obs') needs data: pass data= or give Trainer a train_dataset")
        if method == "obs":  # each pruning step's batches: a function of (seed, step), not of earlier draws
            self._batches = data = StepBatches(data, args.seed if self.seed is None else self.seed)
        structured = self.structure is not None or self.groups is not None
        params = None if structured else self.params if self.params is not None else default_pruning_params(model)
        if self.compact_at_end:
            _check_compactable(model)
        self.pruner = GradualPruner(model, self.schedule["final_sparsity"], self.schedule["start_step"],
                                    self.schedule["end_step"], self.schedule["every"], data=data,
                                    method=method, schedule=self.schedule["schedule"],
                                    initial_sparsity=self.schedule["initial_sparsity"],
                                    batch_loss=(self.batch_loss or _model_loss) if method == "obs" else None,
                                    params=params, settings=self.settings, structure=self.structure,
                                    groups=self.groups)
        self._model = model
        self._pruned = False
        if state.global_step > 0:
            self._restore(args, state)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.pruner is None or not self._pruned:
            return
        with torch.no_grad():
            for param, mask in self._masked():
                if param.grad is not None:
                    param.grad.mul_(mask.to(param.grad.device, param.grad.dtype))

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.pruner is not None and self._pruned:
            self.pruner.masks.apply(self._model)

    def on_step_end(self, args, state, control, **kwargs):
        if self.pruner is None:
            return
        if self.pruner.current_step != state.global_step - 1:
            raise RuntimeError(f"PruningCallback is at step {self.pruner.current_step} but Trainer finished step "
                               f"{state.global_step}; one callback instance serves one training run")
        if self._batches is not None:
            self._batches.step = state.global_step
        if self.pruner.step():
            self._pruned = self.pruner.masks.sparsity() > 0
        self.pruner.detach()  # zeros stay in place; plain weights for Trainer's checkpoints

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.pruner is None or logs is None:
            return
        logs["sparsity"] = self.pruner.sparsity
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["sparsity"] = self.pruner.sparsity

    def on_save(self, args, state, control, **kwargs):
        if self.pruner is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir() or not args.should_save:
            return
        write_state(folder, self.pruner.current_step, self.schedule, self.pruner.masks)

    def on_train_end(self, args, state, control, processing_class=None, **kwargs):
        if self.pruner is None:
            return
        if self._pruned:
            self.pruner.masks.apply(self._model)
        if self.compact_at_end and args.should_save:
            self._save_compacted(Path(args.output_dir) / COMPACTED_DIR, processing_class)

    # -- helpers -----------------------------------------------------------------------------
    def _save_compacted(self, folder: Path, processing_class=None) -> None:
        """Compact a copy of the (masked) model and save it to ``folder``; the model stays as it is."""
        from .hf_compact import save_compacted

        small = copy.deepcopy(self._model)
        for param in small.parameters():
            param.grad = None
        self.compaction = compact(small, self.pruner.masks, groups=self.pruner.groups)
        tokenizer = processing_class if hasattr(processing_class, "save_pretrained") else None
        self.compacted_format = save_compacted(small, folder, tokenizer=tokenizer)
        self.compacted_folder = folder
        del small

    def _masked(self):
        named = dict(self._model.named_parameters())
        return [(named[name], mask) for name, mask in self.pruner.masks.items()]

    def _restore(self, args, state) -> None:
        """The pruning state at ``state.global_step``: from the state files of the folder Trainer resumed
        from (``resume_from``, else Trainer's ``resume_from_checkpoint``, else
        ``<output_dir>/checkpoint-<global_step>``), or, where they are missing or do not match the
        weights Trainer loaded, rebuilt from those weights (pruned weights are exactly zero)."""
        step = state.global_step
        if self.resume_from is not None:
            candidates = [Path(self.resume_from)]
            if not candidates[0].is_dir():
                raise FileNotFoundError(f"PruningCallback(resume_from={str(self.resume_from)!r}): no such folder; pass "
                                        f"the checkpoint folder given to trainer.train(resume_from_checkpoint=...), "
                                        f"or leave resume_from out")
        else:
            candidates = [folder for folder in (resumed_folder(), Path(args.output_dir) / f"checkpoint-{step}")
                          if folder is not None]
        folder = next((folder for folder in candidates if has_state(folder)), None)
        why = f"no {SCHEDULE_FILE} / {STATE_FILE} in {candidates[0] if candidates else args.output_dir}"
        if folder is not None:
            saved, masks = read_state(folder)
            if saved.get("schedule") != self.schedule:
                raise ValueError(f"the checkpoint's pruning schedule {saved.get('schedule')} "
                                 f"({folder / SCHEDULE_FILE}) differs from this callback's {self.schedule}; construct PruningCallback with the "
                                 f"same settings to resume")
            if saved["step"] != step:
                raise ValueError(f"the pruning state in {folder / SCHEDULE_FILE} is for step {saved['step']}, but "
                                 f"training resumes at step {step}; pass PruningCallback(resume_from=<the folder "
                                 f"given to trainer.train(resume_from_checkpoint=...)>)")
            if self._matches_weights(masks):
                self._load(step, masks)
                return
            why = f"the masks in {folder / STATE_FILE} do not match the weights Trainer loaded"
        pruned = step >= self.schedule["start_step"]
        warnings.warn(f"PruningCallback: {why}; the pruning state at step {step} was rebuilt from the model's weights "
                      f"(pruned weights are exactly zero{'' if pruned else '; no pruning step yet, so no masks'})",
                      UserWarning, stacklevel=2)
        self._load(step, masks_from_weights(self._model, list(self.pruner.masks), self.pruner.groups, pruned))

    def _matches_weights(self, masks) -> bool:
        named = dict(self._model.named_parameters())
        return set(masks) == set(self.pruner.masks) and all(
            named[name].shape == mask.shape and not torch.any(named[name].detach()[~mask.to(named[name].device)])
            for name, mask in masks.items() if name in named)

    def _load(self, step: int, masks) -> None:
        self.pruner.load_state_dict({"step": step, "masks": masks})
        self.pruner.detach()
        self._pruned = self.pruner.masks.sparsity() > 0


def _check_structure(structure, groups, params) -> tuple[tuple[str, ...] | None, list[StructureGroup] | None]:
    """(kinds, groups), checked before training: ValueError/TypeError naming the argument."""
    if structure is None and groups is None:
        return None, None
    if structure is not None and groups is not None:
        raise ValueError("pass structure= (to find the structures) or groups= (to give them), not both")
    if params is not None:
        raise ValueError("structure= (or groups=) chooses the parameters itself: leave params= out")
    if groups is not None:
        if not isinstance(groups, (list, tuple)) or not groups or \
                not all(isinstance(group, StructureGroup) for group in groups):
            raise TypeError("groups must be a non-empty list of mfac.prune.StructureGroup")
        return None, list(groups)
    kinds = (structure,) if isinstance(structure, str) else structure
    if not isinstance(kinds, (list, tuple)) or not kinds or any(kind not in KINDS for kind in kinds):
        raise ValueError(f"structure must be one of {KINDS} (or a tuple of them), got {structure!r}")
    return tuple(dict.fromkeys(kinds)), None


def _check_compactable(model: nn.Module) -> None:
    """compact_at_end saves through mfac.hf_compact, which knows BERT-family encoders only."""
    try:
        find_structures(model, ("neurons", "heads"))
        recognised = hasattr(model, "save_pretrained") and hasattr(model, "config")
    except ValueError:
        recognised = False
    if not recognised:
        raise ValueError(f"compact_at_end: {type(model).__name__} is not a Hugging Face BERT-family encoder, which is "
                         f"what mfac.hf_compact.save_compacted saves; pass compact_at_end=False and compact the "
                         f"model yourself after training (mfac.prune.compact(model, callback.pruner.masks))")
