"""``mfac prune``: one-shot OBS or magnitude pruning of a built-in model, or of a local Hugging Face
model on text (its encoder/decoder Linear weights); writes the pruned weights (safetensors, or a
Hugging Face folder ``model/``), the masks as safetensors, and report.json."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint import save_weights
from ..prune import prune_oneshot, recalibrate_batchnorm
from ..prune.oneshot import parse_pattern
from ..training import accuracy
from .common import (CliError, check_out, load_model_weights, prepare, pruning_progress, run_header, staged_output,
                     usage_errors, write_json)


def run(args) -> int:
    out = check_out(args.out, "prune", args.force)
    with usage_errors("--pattern: "):
        nm = parse_pattern(args.pattern)
    if args.model.startswith("hf:"):
        job = _text_job(args)
    else:
        job = _builtin_job(args)
    before = job.accuracy()
    steps = (min(args.recompute, nm[0]) if nm else args.recompute) if args.method == "obs" else 1
    start = time.perf_counter()
    try:
        with pruning_progress(args.method, steps, args.num_grads, f"prune {args.model} ({args.method})",
                              args.quiet) as hooks:
            masks = prune_oneshot(job.model, None if args.pattern else args.sparsity, job.data, job.loss_fn,
                                  method=args.method, num_grads=args.num_grads, damp=args.damp,
                                  relative_damp=args.relative_damp,
                                  block_size=args.block_size or None, recompute=args.recompute,
                                  per_sample=args.per_sample, scope=args.scope, pattern=args.pattern,
                                  params=job.params, batch_loss=job.batch_loss, **hooks)
    except ValueError as error:  # prune_oneshot checks its arguments before it touches the model
        raise CliError(str(error)) from None
    job.after()
    after = job.accuracy()
    report = {**run_header("prune", args, job.description),
              "test_accuracy_before": before, "test_accuracy_after": after,
              "sparsity": masks.sparsity(), "per_tensor_sparsity": masks.per_tensor_sparsity(),
              "seconds": time.perf_counter() - start}
    print(f"pruned {args.model} with {args.method} to sparsity {masks.sparsity():.4f}: test accuracy "
          f"{100 * before:.1f}% -> {100 * after:.1f}%")
    with staged_output(out) as staging:
        report["files"] = [job.save(staging), "masks.safetensors", "report.json"]
        save_weights(masks.state_dict(), staging / "masks.safetensors")
        write_json(staging / "report.json", report)
    print(f"written to {out}/: {', '.join(report['files'])}")
    return 0


@dataclass
class _PruneJob:
    description: str
    model: nn.Module
    data: list
    loss_fn: object
    batch_loss: object
    params: object
    accuracy: object  # () -> test accuracy
    after: object  # () -> None, run after pruning
    save: object  # (folder) -> the name written


def _builtin_job(args) -> _PruneJob:
    task, model, split = prepare(args)
    data = [(split.train_x[i:i + args.batch_size], split.train_y[i:i + args.batch_size])
            for i in range(0, len(split.train_x) - args.batch_size + 1, args.batch_size)]

    def calibrate():
        if args.calibrate_bn:
            recalibrate_batchnorm(model, data, args.calibrate_bn)

    def save(folder):
        save_weights(model.state_dict(), folder / "pruned.safetensors")
        return "pruned.safetensors"

    calibrate()  # the dense model gets the same BatchNorm treatment as the pruned one
    return _PruneJob(task.description, model, data, nn.functional.cross_entropy, None, None,
                     lambda: accuracy(model, split.test_x, split.test_y), calibrate, save)


def _text_job(args) -> _PruneJob:
    from ..hf import default_pruning_params
    from .text import TextBatches, evaluate, load_hf_model, load_text_task, model_loss, save_hf

    task = load_text_task(args.data, args.seed)
    torch.manual_seed(args.seed)
    model, tokenizer = load_hf_model(args.model, task.num_labels)
    if args.checkpoint:
        load_model_weights(model, args.checkpoint, args.model)
    train = TextBatches(tokenizer, task.train_texts, task.train_labels, args.max_length)
    order = torch.randperm(len(task.train_texts), generator=torch.Generator().manual_seed(args.seed))
    needed = args.num_grads if args.per_sample else args.num_grads * args.batch_size
    data = [train.batch(order[i:i + args.batch_size]) for i in range(0, min(len(order), needed), args.batch_size)]
    test = TextBatches(tokenizer, task.test_texts, task.test_labels, args.max_length).in_order(64)
    with usage_errors("--model: "):
        params = default_pruning_params(model)

    def save(folder):
        save_hf(model, tokenizer, folder / "model")
        return "model/"

    return _PruneJob(task.description, model, data, None, model_loss, params, lambda: evaluate(model, test)[1],
                     lambda: None, save)
