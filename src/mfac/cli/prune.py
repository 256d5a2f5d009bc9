"""``mfac prune``: one-shot OBS or magnitude pruning of a built-in model, or of a local Hugging Face
model on text (its encoder/decoder Linear weights), or gradual pruning while training; with
``--structure``, one-shot removal of whole neurons, channels or attention heads, and with
``--compact`` the model rebuilt without them.

Writes the pruned weights (``pruned.safetensors``, or a Hugging Face folder ``model/``; with
``--gradual`` ``model.safetensors`` or ``model/``), the masks (``masks.safetensors``) and
``report.json``; an unstructured prune also writes its weights compactly as values plus a bitmask
(``*.sparse.safetensors``, :mod:`mfac.sparse_io`), and ``--compact`` the smaller model
(``compacted.safetensors``, :mod:`mfac.cli.compacted`, or a ``compacted/`` folder,
:mod:`mfac.hf_compact`). The report gives parameters, FLOPs per sample, size on disk and latency
before and after (:mod:`mfac.cli.model_size`)."""

from __future__ import annotations

import copy
import math
import time

import torch
from torch import nn

from ..checkpoint import save_weights
from ..defaults import EXACT, GRADUAL_RECOMPUTE, PRUNE_RECOMPUTE
from ..progress import Progress
from ..prune import GradualPruner, compact, find_structures, prune_oneshot
from ..prune.compact import removed_structures
from ..prune.oneshot import parse_pattern
from ..prune.structures import KINDS
from ..sparse_io import save_sparse
from .errors import CliError, RunError, usage_errors
from .model_size import describe, forward, latency_ms, measure, parameter_counts, size_entries, weights_bytes
from .optimizers import make_optimizer
from .output import check_out, staged_output
from .prune_jobs import PruneJob, builtin_job, dense_bytes, first_sample, text_job
from .pruning_progress import pruning_progress
from .reports import run_header, write_json


def run(args) -> int:
    _check_flags(args)
    out = check_out(args.out, "prune", args.force)
    with usage_errors("--pattern: "):
        nm = parse_pattern(args.pattern)
    if args.gradual:
        return _gradual(args, out, nm)
    args.recompute = args.recompute or PRUNE_RECOMPUTE
    job = text_job(args) if args.model.startswith("hf:") else builtin_job(args)
    groups = _structure_groups(job.model, args.structure, args.model) if args.structure else None
    dense = {**measure(job.model, first_sample(job.inputs)),
             "file_bytes": dense_bytes(job.model, args.model.startswith("hf:")), "model": copy.deepcopy(job.model)}
    before = job.accuracy()
    steps = (min(args.recompute, nm[0]) if nm else args.recompute) if args.method == "obs" else 1
    start = time.perf_counter()
    try:
        with pruning_progress(args.method, steps, args.num_grads, f"prune {args.model} ({args.method})",
                              args.quiet) as hooks:
            masks = prune_oneshot(job.model, None if args.pattern else args.sparsity, job.data, job.loss_fn,
                                  method=args.method, num_grads=args.num_grads, damp=args.damp,
                                  relative_damp=args.relative_damp,
                                  block_size=_block_size(args), recompute=args.recompute,
                                  per_sample=args.per_sample, scope=args.scope, pattern=args.pattern,
                                  params=job.params, batch_loss=job.batch_loss, structure=args.structure, **hooks)
    except ValueError as error:  # prune_oneshot checks its arguments before it touches the model
        raise CliError(str(error)) from None
    job.after()
    after = job.accuracy()
    report = {**run_header("prune", args, job.description),
              "test_accuracy_before": before, "test_accuracy_after": after,
              "sparsity": masks.sparsity(), "per_tensor_sparsity": masks.per_tensor_sparsity(),
              "seconds": time.perf_counter() - start}
    accuracy_text = f"test accuracy {100 * before:.1f}% -> {100 * after:.1f}%"
    if groups is None:
        print(f"pruned {args.model} with {args.method} to sparsity {masks.sparsity():.4f}: {accuracy_text}")
    else:
        report.update(_structure_entries(job.model, groups, masks))
        removed = ", ".join(f"{n['before'] - n['after']} of {n['before']} {kind}"
                            for kind, n in report["structures"].items())
        print(f"pruned {args.model} with {args.method}: removed {removed} (fraction {report['structure_sparsity']:.4f}"
              f" of the structures, {masks.sparsity():.4f} of the weights they hold): {accuracy_text}")
    return _write_oneshot(out, args, job, masks, groups, dense, report)


def _check_flags(args) -> None:
    """Flags that do not go together: found before anything is loaded."""
    if args.compact and not args.structure:
        raise CliError("--compact needs --structure (neurons, channels or heads): only whole structures can be cut "
                       "out of the layers")
    if args.structure and args.pattern:
        raise CliError(f"--structure {','.join(args.structure)} cannot be combined with --pattern {args.pattern} "
                       f"(N:M sparsity inside rows); leave one out")
    if args.structure and args.gradual:
        raise CliError(f"--structure {','.join(args.structure)} prunes one-shot; --gradual prunes single weights "
                       f"while training: leave one out")


def _structure_groups(model: nn.Module, kinds: tuple[str, ...], model_name: str) -> list:
    """The structure groups of ``kinds`` in the model; a usage error naming what there is when one
    of the kinds is not in it."""
    try:
        everything = find_structures(model, KINDS)
    except ValueError:  # nothing recognised at all
        everything = []
    found = [kind for kind in KINDS if any(group.kind == kind for group in everything)]
    missing = [kind for kind in kinds if kind not in found]
    if missing:
        there = (f"it has {' and '.join(found)} (--structure {','.join(found)})" if found else
                 "no structure was recognised in it (recognised: nn.Sequential MLPs and CNNs, residual basic "
                 "blocks, Hugging Face BERT-family encoders)")
        raise CliError(f"--structure {','.join(kinds)}: --model {model_name} has no {' or '.join(missing)} to "
                       f"remove; {there}")
    return [group for group in everything if group.kind in kinds]


def _structure_entries(model: nn.Module, groups: list, masks) -> dict:
    """Report entries of a structured prune: structures per group and per kind, before and after."""
    sizes = {group.name: (group.count, group.count - int(removed_structures(model, group, masks).sum()))
             for group in groups}
    kinds = {}
    for group in groups:
        entry = kinds.setdefault(group.kind, {"before": 0, "after": 0})
        entry["before"] += sizes[group.name][0]
        entry["after"] += sizes[group.name][1]
    total = sum(entry["before"] for entry in kinds.values())
    kept = sum(entry["after"] for entry in kinds.values())
    return {"structures": kinds, "structure_sparsity": (total - kept) / total,
            "structure_sizes": {name: list(pair) for name, pair in sizes.items()}}


def _block_size(args) -> int | str:
    """``--block-size``, with 0 spelled as the library spells the exact (unblocked) inverse."""
    return EXACT if args.block_size == 0 else args.block_size


def _sparse_name(dense_name: str) -> str:
    """pruned.safetensors -> pruned.sparse.safetensors; a folder model/ -> model.sparse.safetensors."""
    return dense_name.rstrip("/").removesuffix(".safetensors") + ".sparse.safetensors"


@torch.no_grad()
def _outputs(model: nn.Module, inputs) -> torch.Tensor:
    was_training = model.training
    model.eval()
    output = forward(model, inputs)
    model.train(was_training)
    return getattr(output, "logits", output).detach().float()


def _write_oneshot(out, args, job: PruneJob, masks, groups, dense: dict, report: dict) -> int:
    """Write the pruned model, its masks, the sparse file or the compacted model, and the report with
    the sizes before and after, staged and renamed into ``out`` together."""
    compacted = None
    with staged_output(out) as staging:
        files = [job.save(staging), "masks.safetensors"]
        save_weights(masks.state_dict(), staging / "masks.safetensors")
        if groups is None:  # unstructured: the same weights, values plus a bitmask
            files.append(_sparse_name(files[0]))
            save_sparse(job.model.state_dict(), masks.state_dict(), staging / files[-1])
            what = "the pruned model; file_bytes_after: its sparse file (values plus a bitmask)"
        elif args.compact:
            compacted = _compact(job, masks, groups, staging)
            files.append(compacted["file"])
            what = "the compacted model"
        else:
            what = "the pruned model, zeros in place (add --compact for the smaller model)"
        pruned = {**measure(job.model, first_sample(job.inputs)), "file_bytes": weights_bytes(staging / files[-1])}
        dense["latency_ms"], pruned["latency_ms"] = latency_ms([dense.pop("model"), job.model], job.inputs,
                                                               args.latency_runs)
        if compacted is not None:
            report["compacted"] = compacted
        report.update(size_entries(dense, pruned, args.batch_size, args.latency_runs, what))
        report["file_bytes"] = {name: weights_bytes(staging / name) for name in files}
        report["files"] = [*files, "report.json"]
        write_json(staging / "report.json", report)
    print(describe(dense, pruned, args.batch_size, args.latency_runs))
    if compacted is not None:
        plain = "yes" if compacted["loads_in"] == "transformers" else "no"
        print(f"compacted model: {compacted['file']} (test accuracy {100 * compacted['test_accuracy']:.1f}%); plain "
              f"transformers loads it: {plain}; load it with {compacted['load_with']}"
              if args.model.startswith("hf:") else
              f"compacted model: {compacted['file']} (test accuracy {100 * compacted['test_accuracy']:.1f}%); load "
              f"it with {compacted['load_with']}")
    print(f"written to {out}/: {', '.join(report['files'])}")
    return 0


def _compact(job: PruneJob, masks, groups: list, staging) -> dict:
    """Compact the pruned model in place (its masked form is written already) and write it."""
    reference = _outputs(job.model, job.inputs)
    result = compact(job.model, masks, groups)
    difference = float((_outputs(job.model, job.inputs) - reference).abs().max())
    name, loader, loads_in = job.save_compacted(staging, result.sizes)
    return {"file": name, "loads_in": loads_in, "load_with": loader,
            "structure_sizes": {group: list(pair) for group, pair in result.sizes.items()},
            "removed": result.removed, "test_accuracy": job.accuracy(),
            "max_abs_output_difference": difference}


def _write(out, save_model, masks, report: dict, model: nn.Module, dense: dict) -> int:
    """Gradual pruning's outputs: the pruned model, its weights as values plus a bitmask, its masks
    and the report (with parameters and sizes on disk before and after), staged and renamed into
    ``out`` together."""
    with staged_output(out) as staging:
        files = [save_model(staging), "masks.safetensors"]
        save_weights(masks.state_dict(), staging / "masks.safetensors")
        files.append(_sparse_name(files[0]))
        save_sparse(model.state_dict(), masks.state_dict(), staging / files[-1])
        total, nonzero = parameter_counts(model)
        after = {"parameters": total, "nonzero_parameters": nonzero, "file_bytes": weights_bytes(staging / files[-1])}
        for key in after:
            report[f"{key}_before"], report[f"{key}_after"] = dense[key], after[key]
        report["file_bytes"] = {name: weights_bytes(staging / name) for name in files}
        report["files"] = [*files, "report.json"]
        write_json(staging / "report.json", report)
    print(f"size on disk: {dense['file_bytes'] / 1e3:,.1f} kB dense -> {after['file_bytes'] / 1e3:,.1f} kB as values "
          f"plus a bitmask ({files[-1]})")
    print(f"written to {out}/: {', '.join(report['files'])}")
    return 0


def _gradual(args, out, nm) -> int:
    """Train for --steps while GradualPruner prunes on its schedule; the model, masks and a report."""
    from .train import make_job

    if nm is not None:
        raise CliError("--pattern applies to one-shot pruning; leave it out with --gradual")
    start_step = args.prune_start if args.prune_start is not None else max(1, args.steps // 10)
    end_step = args.prune_end if args.prune_end is not None else max(start_step, (7 * args.steps) // 10)
    every = args.prune_every or max(1, (end_step - start_step) // 8)
    if end_step > args.steps:
        raise CliError(f"--prune-end {end_step} is after the last of --steps {args.steps}")
    job = make_job(args)
    model = job.model
    hf_model = args.model.startswith("hf:")
    params = None
    if hf_model:
        from ..hf import default_pruning_params

        with usage_errors("--model: "):
            params = default_pruning_params(model)
    data, loss = None, {}
    if args.method == "obs":
        rows_per_batch = args.batch_size if args.per_sample else 1
        data = [job.make_batch(next(job.stream)) for _ in range(-(-args.num_grads // rows_per_batch))]
        loss = {"batch_loss": job.loss} if hf_model else {"loss_fn": nn.functional.cross_entropy}
    with usage_errors():
        opt = make_optimizer(args.optimizer, model.parameters(), args.lr)  # MFAC and SGD: the small-model recipe
        pruner = GradualPruner(model, args.sparsity, start_step, end_step, every, data=data, method=args.method,
                               params=params, num_grads=args.num_grads, block_size=_block_size(args),
                               recompute=args.recompute or GRADUAL_RECOMPUTE, per_sample=args.per_sample,
                               damp=args.damp, relative_damp=args.relative_damp, scope=args.scope, **loss)
    total, nonzero = parameter_counts(model)
    dense = {"parameters": total, "nonzero_parameters": nonzero, "file_bytes": dense_bytes(model, hf_model)}
    before = job.test_accuracy()
    started = time.perf_counter()
    losses = []
    model.train()
    with Progress(args.steps, f"prune {args.model} gradually ({args.method})", args.quiet) as bar:
        for _ in range(args.steps):
            batch = job.make_batch(next(job.stream))
            opt.zero_grad()
            value = job.loss(model, batch)
            value.backward()
            opt.step()
            pruner.step()
            losses.append(float(value.detach()))
            if not math.isfinite(losses[-1]):
                pruner.detach()
                raise RunError(f"training diverged at step {len(losses)} (the loss became NaN or Inf); lower --lr")
            bar.update(1, loss=losses[-1], sparsity=pruner.sparsity)
    pruner.detach()
    after = job.test_accuracy()
    masks = pruner.masks
    report = {**run_header("prune", args, job.description), "gradual": {
                  "start_step": start_step, "end_step": end_step, "every": every, "batch_losses": losses},
              "test_accuracy_before": before, "test_accuracy_after": after, "sparsity": masks.sparsity(),
              "per_tensor_sparsity": masks.per_tensor_sparsity(), "seconds": time.perf_counter() - started}
    print(f"trained {args.model} for {args.steps} steps while pruning with {args.method} to sparsity "
          f"{masks.sparsity():.4f} (steps {start_step}-{end_step}, every {every}): test accuracy "
          f"{100 * before:.1f}% -> {100 * after:.1f}%")
    return _write(out, job.save_model, masks, report, model, dense)
