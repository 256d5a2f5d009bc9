"""``mfac prune``: one-shot OBS or magnitude pruning of a built-in model, or of a local Hugging Face
model on text (its encoder/decoder Linear weights), or gradual pruning while training; with
``--structure``, one-shot removal of whole neurons, channels or attention heads, and with
``--compact`` the model rebuilt without them.

Writes the pruned weights (``pruned.safetensors``, or a Hugging Face folder ``model/``, one-shot and
``--gradual`` alike), the masks (``masks.safetensors``), ``report.json`` and ``report.md`` (per-layer
sparsity and the figures); an unstructured prune also writes its weights compactly as values plus a bitmask
(``*.sparse.safetensors``, :mod:`mfac.sparse_io`), and ``--compact`` the smaller model
(``compacted.safetensors``, :mod:`mfac.cli.compacted`, or a ``compacted/`` folder,
:mod:`mfac.hf_compact`). The report gives parameters, FLOPs per sample, size on disk and latency
before and after (:mod:`mfac.cli.model_size`). A one-shot prune of a built-in model needs trained
weights (``--checkpoint``), or ``--allow-untrained``. ``--gradual`` runs in
:mod:`mfac.cli.prune_gradual` (checkpoints, ``--resume``)."""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from ..checkpoint import save_weights
from ..defaults import PRUNE_RECOMPUTE
from ..prune import compact, find_structures, prune_oneshot
from ..prune.compact import removed_structures
from ..prune.oneshot import parse_pattern
from ..prune.structures import KINDS
from ..sparse_io import save_sparse
from .errors import CliError, usage_errors
from .model_size import describe, forward, latency_ms, measure, size_entries, weights_bytes
from .output import check_out, staged_output
from .prune_gradual import gradual, resume
from .prune_jobs import PruneJob, block_size, builtin_job, check_pattern, dense_bytes, first_sample, sparse_name, \
    text_job
from .pruning_progress import pruning_progress
from .reports import run_header, unused_settings, write_json, write_markdown, prune_figures

GRADUAL_FLAGS = ("steps", "optimizer", "lr", "density", "window_dtype", "max_grad_norm", "prune_start", "prune_end",
                 "prune_every", "checkpoint_every")


def run(args) -> int:
    if args.resume:
        return resume(args)
    _check_flags(args)
    out = check_out(args.out, "prune", args.force)
    with usage_errors("--pattern: "):
        nm = parse_pattern(args.pattern)
    if args.gradual:
        return gradual(args, out)
    args.recompute = args.recompute or PRUNE_RECOMPUTE
    job = text_job(args) if args.model.startswith("hf:") else builtin_job(args)
    groups = _structure_groups(job.model, args.structure, args.model) if args.structure else None
    check_pattern(job.model, job.params, nm, args.pattern)
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
                                  block_size=block_size(args), recompute=args.recompute,
                                  per_sample=args.per_sample, scope=args.scope, pattern=args.pattern,
                                  params=job.params, batch_loss=job.batch_loss, structure=args.structure, **hooks)
    except ValueError as error:  # prune_oneshot checks its arguments before it touches the model
        raise CliError(str(error)) from None
    job.after()
    after = job.accuracy()
    report = {**run_header("prune", args, job.description, unused_settings(args)), "evaluated_on": job.eval_name,
              "test_accuracy_before": before, "test_accuracy_after": after,
              "sparsity": masks.sparsity(), "per_tensor_sparsity": masks.per_tensor_sparsity(),
              "seconds": time.perf_counter() - start}
    accuracy_text = f"{job.eval_name} accuracy {100 * before:.1f}% -> {100 * after:.1f}%"
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
    """Flags that do not go together, and a prune of random weights: found before anything is loaded."""
    if args.compact and not args.structure:
        raise CliError("--compact needs --structure (neurons, channels or heads): only whole structures can be cut "
                       "out of the layers")
    if args.structure and args.pattern:
        raise CliError(f"--structure {','.join(args.structure)} cannot be combined with --pattern {args.pattern} "
                       f"(N:M sparsity inside rows); leave one out")
    if args.structure and args.gradual:
        raise CliError(f"--structure {','.join(args.structure)} prunes one-shot; --gradual prunes single weights "
                       f"while training: leave one out")
    if args.pattern and args.gradual:
        raise CliError(f"--pattern {args.pattern} applies to one-shot pruning; leave it out with --gradual")
    if not args.gradual:
        given = [key for key in GRADUAL_FLAGS if getattr(args, key) != args.option_defaults[key]]
        if given:
            flag = f"--{given[0].replace('_', '-')}"
            raise CliError(f"{flag} applies to --gradual (pruning while training); add --gradual, or leave {flag} out "
                           f"for a one-shot prune")
        if not args.model.startswith("hf:") and not args.checkpoint and not args.allow_untrained:
            raise CliError(f"--model {args.model} without --checkpoint would prune an untrained model (its random "
                           f"initial weights); pass --checkpoint PATH (e.g. the model.safetensors of `mfac train`), or "
                           f"--allow-untrained to prune it anyway")


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
            files.append(sparse_name(files[0]))
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
        report["files"] = [*files, "report.md", "report.json"]
        write_markdown(staging / "report.md", "mfac prune", report, prune_figures(report))
        write_json(staging / "report.json", report)
    print(describe(dense, pruned, args.batch_size, args.latency_runs))
    if compacted is not None:
        plain = "yes" if compacted["loads_in"] == "transformers" else "no"
        accuracy = f"{job.eval_name} accuracy {100 * compacted['test_accuracy']:.1f}%"
        print(f"compacted model: {compacted['file']} ({accuracy}); plain transformers loads it: {plain}; load it with "
              f"{compacted['load_with']}" if args.model.startswith("hf:") else
              f"compacted model: {compacted['file']} ({accuracy}); load it with {compacted['load_with']}")
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
