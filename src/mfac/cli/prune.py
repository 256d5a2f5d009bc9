"""``mfac prune``: one-shot OBS or magnitude pruning of a built-in model, or of a local Hugging Face
model on text (its encoder/decoder Linear weights); writes the pruned weights (safetensors, or a
Hugging Face folder ``model/``), the masks as safetensors, and report.json."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint import save_weights
from ..defaults import EXACT, GRADUAL_RECOMPUTE, PRUNE_RECOMPUTE
from ..progress import Progress
from ..prune import GradualPruner, prune_oneshot, recalibrate_batchnorm
from ..prune.oneshot import parse_pattern
from ..training import accuracy
from .errors import CliError, RunError, usage_errors
from .optimizers import make_optimizer
from .output import check_out, staged_output
from .pruning_progress import pruning_progress
from .reports import run_header, write_json
from .tasks import load_model_weights, prepare


def run(args) -> int:
    out = check_out(args.out, "prune", args.force)
    with usage_errors("--pattern: "):
        nm = parse_pattern(args.pattern)
    if args.gradual:
        return _gradual(args, out, nm)
    args.recompute = args.recompute or PRUNE_RECOMPUTE
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
                                  block_size=_block_size(args), recompute=args.recompute,
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
    return _write(out, job.save, masks, report)


def _block_size(args) -> int | str:
    """``--block-size``, with 0 spelled as the library spells the exact (unblocked) inverse."""
    return EXACT if args.block_size == 0 else args.block_size


def _write(out, save_model, masks, report: dict) -> int:
    """The pruned model, its masks and the report, staged and renamed into ``out`` together."""
    with staged_output(out) as staging:
        report["files"] = [save_model(staging), "masks.safetensors", "report.json"]
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
    return _write(out, job.save_model, masks, report)
