"""``mfac prune --gradual``: train while :class:`mfac.prune.GradualPruner` prunes on its cubic
schedule, resumable after any kill.

Every ``--checkpoint-every`` steps (and at the end; never with 0) the run writes ``checkpoint.pt``
into its ``--out`` folder, atomically: the model (the stored weights under the masks included), the
optimizer's state, the pruner's state (step and masks), the training data's position, the position
in the batches that OBS draws its gradients from, the random state, the losses so far and the run's
settings. ``mfac prune --resume DIR`` reloads it and continues; the pruned model is then bit for
bit the one an uninterrupted run would have produced. At the end the run writes the pruned model
(``pruned.safetensors``, or the Hugging Face folder ``model/``), its masks, its weights as values
plus a bitmask, ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import checkpoint
from ..checkpoint import save_weights
from ..defaults import GRADUAL_NUM_GRADS, GRADUAL_RECOMPUTE
from ..progress import Progress
from ..prune import GradualPruner
from ..resources import InsufficientMemoryError
from ..sparse_io import save_sparse
from .budget import check_budget
from .errors import CliError, RunError, usage_errors
from .model_size import parameter_counts, weights_bytes
from .optimizers import gradual_settings, make_optimizer
from .output import load_run_checkpoint, staged_output, take_run_settings
from .prune_jobs import PRUNED_FILE, block_size, dense_bytes, resolve_num_grads, sparse_name
from .reports import prune_figures, run_header, unused_settings, write_json, write_markdown
from .train import Job, make_job

__all__ = ["gradual", "resume", "Cycled", "CHECKPOINT"]

CHECKPOINT = "checkpoint.pt"
FORMAT = 1
KIND = "mfac prune --gradual"
# Settings a resumed run takes from its checkpoint; --steps, --checkpoint-every and --quiet may change.
RUN_SETTINGS = ("model", "data", "checkpoint", "batch_size", "max_length", "new_head", "method", "sparsity", "scope",
                "num_grads", "per_sample", "damp", "relative_damp", "block_size", "recompute", "optimizer", "lr",
                "density", "window_dtype", "max_grad_norm", "prune_start", "prune_end", "prune_every", "seed")
_PARAMETRIZED = re.compile(r"(.*?)parametrizations\.([^.]+)\.original")


class Cycled:
    """The batches OBS draws its gradients from, cycled forever from position ``taken``, which
    counts the batches handed out (saved in a checkpoint, so that a resumed run draws the same)."""

    def __init__(self, items: list, taken: int = 0):
        self.items, self.taken = items, taken

    def __iter__(self):
        while True:
            item = self.items[self.taken % len(self.items)]
            self.taken += 1
            yield item


@dataclass
class GradualRun:
    job: Job
    opt: object
    pruner: GradualPruner
    data: Cycled | None
    memory: dict


def _schedule(args) -> None:
    """Resolve --prune-start, --prune-end and --prune-every, refusing a schedule that does not fit."""
    start = args.prune_start if args.prune_start is not None else max(1, args.steps // 10)
    if start > args.steps:
        raise CliError(f"--prune-start {start} is after the last of --steps {args.steps}; lower --prune-start or raise "
                       f"--steps (see mfac prune --help)")
    end = args.prune_end if args.prune_end is not None else max(start, (7 * args.steps) // 10)
    if end < start:
        raise CliError(f"--prune-end {end} comes before --prune-start {start}: pruning must end at or after the step "
                       f"it starts; give a --prune-end of at least {start} (see mfac prune --help)")
    if end > args.steps:
        raise CliError(f"--prune-end {end} is after the last of --steps {args.steps}; lower --prune-end or raise "
                       f"--steps")
    args.prune_start, args.prune_end = start, end
    args.prune_every = args.prune_every or max(1, (end - start) // 8)


def _setup(args, out: Path, load_weights: bool = True) -> GradualRun:
    """The model and data (as ``mfac train`` makes them), OBS's batches, the optimizer and the pruner;
    resolved settings are written back to ``args``, so that they are reported and checkpointed."""
    job = make_job(args, load_weights)
    model, hf_model = job.model, args.model.startswith("hf:")
    usable = job.train_samples // args.batch_size
    resolve_num_grads(args, usable * args.batch_size, usable, GRADUAL_NUM_GRADS)
    settings = gradual_settings(args)
    args.lr, args.density, args.window_dtype = settings["lr"], settings["density"], settings["window_dtype"]
    args.max_grad_norm = settings["max_grad_norm"]
    args.recompute = args.recompute or GRADUAL_RECOMPUTE
    params = None
    if hf_model:
        from ..hf import default_pruning_params

        with usage_errors("--model: "):
            params = default_pruning_params(model)
    data, loss = None, {}
    if args.method == "obs":
        rows_per_batch = args.batch_size if args.per_sample else 1
        data = Cycled([job.make_batch(next(job.stream)) for _ in range(-(-args.num_grads // rows_per_batch))])
        loss = {"batch_loss": job.loss} if hf_model else {"loss_fn": nn.functional.cross_entropy}
    trainable = [p for p in model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in trainable)
    if args.optimizer == "mfac" and settings["density"] < 1 and dim <= settings["window"]:
        raise CliError(f"--density {settings['density']:g} (a compressed window) needs more coordinates than MFAC's "
                       f"window of {settings['window']} holds gradients, but --model {args.model} has {dim:,}; pass "
                       f"--density 1")
    memory = check_budget(model, args.optimizer, settings, out, args.checkpoint_every, args.quiet)
    with usage_errors():
        try:
            opt = make_optimizer(args.optimizer, trainable, **settings)
        except InsufficientMemoryError as error:
            raise CliError(f"{error} (flags: --density, --window-dtype, --optimizer)") from None
        pruner = GradualPruner(model, args.sparsity, args.prune_start, args.prune_end, args.prune_every, data=data,
                               method=args.method, params=params, num_grads=args.num_grads,
                               block_size=block_size(args), recompute=args.recompute, per_sample=args.per_sample,
                               damp=args.damp, relative_damp=args.relative_damp, scope=args.scope, **loss)
    return GradualRun(job, opt, pruner, data, memory)


def gradual(args, out: Path) -> int:
    """Train for --steps while GradualPruner prunes on its schedule; the model, masks and a report."""
    _schedule(args)
    run = _setup(args, out)
    model = run.job.model
    total, nonzero = parameter_counts(model)
    dense = {"parameters": total, "nonzero_parameters": nonzero,
             "file_bytes": dense_bytes(model, args.model.startswith("hf:"))}
    progress = {"step": 0, "losses": [], "seconds": 0.0, "resumed_at": [], "before": run.job.test_accuracy(),
                "dense": dense}
    if args.checkpoint_every:
        out.mkdir(parents=True, exist_ok=True)
    return _train(args, out, run, progress)


def _plain_state(model: nn.Module) -> tuple[dict, list[str]]:
    """The model's state under plain parameter names (a masked weight's stored original under its
    own name), and the names of the masked ones."""
    state, masked = {}, []
    for key, value in model.state_dict().items():
        match = _PARAMETRIZED.fullmatch(key)
        if match:
            state[match[1] + match[2]] = value
            masked.append(match[1] + match[2])
        elif "parametrizations." not in key:
            state[key] = value
    return state, masked


def _save(out: Path, args, run: GradualRun, progress: dict) -> None:
    state, masked = _plain_state(run.job.model)
    checkpoint.save({"format": FORMAT, "kind": KIND,
                     "settings": {key: getattr(args, key) for key in (*RUN_SETTINGS, "steps")},
                     "model": state, "masked": masked, "optimizer": run.opt.state_dict(),
                     "pruner": run.pruner.state_dict(), "batches": run.job.stream.state_dict(),
                     "obs_batches_taken": run.data.taken if run.data is not None else 0,
                     "torch_rng": torch.get_rng_state(), **progress}, out / CHECKPOINT)


def _train(args, out: Path, run: GradualRun, progress: dict) -> int:
    job, model, opt, pruner = run.job, run.job.model, run.opt, run.pruner
    started = time.perf_counter()
    model.train()
    with Progress(args.steps, f"prune {args.model} gradually ({args.method})", args.quiet) as bar:
        bar.update(progress["step"])
        while progress["step"] < args.steps:
            value = job.train_step(opt)
            pruner.step()
            progress["losses"].append(value)
            progress["step"] += 1
            if not math.isfinite(progress["losses"][-1]):
                pruner.detach()
                raise RunError(f"training diverged at step {progress['step']} (the loss became NaN or Inf); lower --lr")
            bar.update(1, loss=progress["losses"][-1], sparsity=pruner.sparsity)
            if job.checkpoint_due(args, progress["step"]):
                progress["seconds"] += time.perf_counter() - started
                started = time.perf_counter()
                _save(out, args, run, progress)
    progress["seconds"] += time.perf_counter() - started
    pruner.detach()
    after = job.test_accuracy()
    masks = pruner.masks
    report = {**run_header("prune", args, job.description, unused_settings(args)), "evaluated_on": job.eval_name,
              "gradual": {"start_step": args.prune_start, "end_step": args.prune_end, "every": args.prune_every,
                          "batch_losses": progress["losses"], "resumed_at_steps": progress["resumed_at"]},
              "test_accuracy_before": progress["before"], "test_accuracy_after": after, "sparsity": masks.sparsity(),
              "per_tensor_sparsity": masks.per_tensor_sparsity(), "seconds": progress["seconds"], "memory": run.memory}
    print(f"trained {args.model} for {args.steps} steps while pruning with {args.method} to sparsity "
          f"{masks.sparsity():.4f} (steps {args.prune_start}-{args.prune_end}, every {args.prune_every}): "
          f"{job.eval_name} accuracy {100 * progress['before']:.1f}% -> {100 * after:.1f}%")
    return _write(out, job.save_model if args.model.startswith("hf:") else _save_pruned(model), masks, report, model,
                  progress["dense"])


def _save_pruned(model: nn.Module):
    def save(folder: Path) -> str:
        save_weights(model.state_dict(), folder / PRUNED_FILE)
        return PRUNED_FILE
    return save


def _write(out: Path, save_model, masks, report: dict, model: nn.Module, dense: dict) -> int:
    """The pruned model, its weights as values plus a bitmask, its masks and the reports (with
    parameters and sizes on disk before and after), staged and renamed into ``out`` together."""
    kept = [CHECKPOINT] if (Path(out) / CHECKPOINT).is_file() else []
    with staged_output(out) as staging:
        files = [save_model(staging), "masks.safetensors"]
        save_weights(masks.state_dict(), staging / "masks.safetensors")
        files.append(sparse_name(files[0]))
        save_sparse(model.state_dict(), masks.state_dict(), staging / files[-1])
        total, nonzero = parameter_counts(model)
        after = {"parameters": total, "nonzero_parameters": nonzero, "file_bytes": weights_bytes(staging / files[-1])}
        for key in after:
            report[f"{key}_before"], report[f"{key}_after"] = dense[key], after[key]
        report["file_bytes"] = {name: weights_bytes(staging / name) for name in files}
        report["files"] = [*files, "report.md", "report.json", *kept]
        write_markdown(staging / "report.md", "mfac prune --gradual", report, prune_figures(report))
        write_json(staging / "report.json", report)
    print(f"size on disk: {dense['file_bytes'] / 1e3:,.1f} kB dense -> {after['file_bytes'] / 1e3:,.1f} kB as values "
          f"plus a bitmask ({files[2]})")
    print(f"written to {out}/: {', '.join(report['files'])}")
    return 0


def _load(args, folder: Path) -> dict:
    """The checkpoint of the --gradual run in ``folder``, checked; no checkpoint is a usage error
    that says why."""
    saved = load_run_checkpoint(args, folder, CHECKPOINT, "mfac prune --gradual")
    if not isinstance(saved, dict) or saved.get("kind") != KIND or saved.get("format") != FORMAT:
        raise CliError(f"--resume {folder}: {folder / CHECKPOINT} is not a checkpoint of this version of mfac prune "
                       f"--gradual (a `mfac train` run resumes with mfac train --resume)")
    return saved


def _take_settings(args, saved: dict) -> None:
    """The resumed run's own settings into ``args``; a different one given on the command line is
    a usage error."""
    legacy = {"max_grad_norm": 0.0}  # runs from before --max-grad-norm did not clip
    take_run_settings(args, {**legacy, **saved["settings"]}, RUN_SETTINGS, "mfac prune")
    args.gradual = True
    if args.steps < saved["step"]:
        raise CliError(f"--steps {args.steps} is fewer than the {saved['step']} steps the run has already taken")


def resume(args) -> int:
    """``mfac prune --resume DIR``: continue a stopped or killed --gradual run from its checkpoint."""
    folder = Path(args.resume)
    saved = _load(args, folder)
    _take_settings(args, saved)
    args.out = str(folder)
    run = _setup(args, folder, load_weights=False)  # the model comes from the checkpoint
    model = run.job.model
    with usage_errors(f"--resume {folder}: "):
        try:
            model.load_state_dict(saved["model"])
        except RuntimeError as error:
            raise ValueError(f"the saved model does not fit --model {args.model}: {str(error)[:200]}") from None
        run.pruner.load_state_dict(saved["pruner"])  # attaches the masks, zeroing the stored weights under them
        for name in saved["masked"]:  # ... which the optimizer may have moved: put them back as they were
            module_name, _, tensor = name.rpartition(".")
            module = model.get_submodule(module_name)
            if parametrize.is_parametrized(module, tensor):
                with torch.no_grad():
                    module.parametrizations[tensor].original.copy_(saved["model"][name])
        run.opt.load_state_dict(saved["optimizer"])
        run.job.stream.load_state_dict(saved["batches"])
        if run.data is not None:
            run.data.taken = saved["obs_batches_taken"]
        torch.set_rng_state(saved["torch_rng"])
    progress = {key: saved[key] for key in ("step", "losses", "seconds", "resumed_at", "before", "dense")}
    progress["resumed_at"] = [*progress["resumed_at"], saved["step"]]
    if not args.quiet:
        print(f"resuming {folder} at step {saved['step']} of {args.steps}")
    return _train(args, folder, run, progress)
