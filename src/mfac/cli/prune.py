"""``mfac prune``: one-shot OBS or magnitude pruning of a built-in model; writes the pruned weights
and the masks as safetensors, and report.json."""

from __future__ import annotations

import time

from torch import nn

from ..checkpoint import save_weights
from ..prune import prune_oneshot, recalibrate_batchnorm
from ..prune.oneshot import parse_pattern
from ..training import accuracy
from .common import CliError, check_out, prepare, pruning_progress, run_header, staged_output, usage_errors, write_json


def run(args) -> int:
    out = check_out(args.out, "prune", args.force)
    with usage_errors("--pattern: "):
        nm = parse_pattern(args.pattern)
    task, model, split = prepare(args)
    data = [(split.train_x[i:i + args.batch_size], split.train_y[i:i + args.batch_size])
            for i in range(0, len(split.train_x) - args.batch_size + 1, args.batch_size)]
    if args.calibrate_bn:  # the dense model gets the same BatchNorm treatment as the pruned one
        recalibrate_batchnorm(model, data, args.calibrate_bn)
    before = accuracy(model, split.test_x, split.test_y)
    steps = (min(args.recompute, nm[0]) if nm else args.recompute) if args.method == "obs" else 1
    start = time.perf_counter()
    try:
        with pruning_progress(args.method, steps, args.num_grads, f"prune {args.model} ({args.method})",
                              args.quiet) as hooks:
            masks = prune_oneshot(model, None if args.pattern else args.sparsity, data, nn.functional.cross_entropy,
                                  method=args.method, num_grads=args.num_grads, damp=args.damp,
                                  relative_damp=args.relative_damp,
                                  block_size=args.block_size or None, recompute=args.recompute,
                                  per_sample=args.per_sample, scope=args.scope, pattern=args.pattern, **hooks)
    except ValueError as error:  # prune_oneshot checks its arguments before it touches the model
        raise CliError(str(error)) from None
    if args.calibrate_bn:
        recalibrate_batchnorm(model, data, args.calibrate_bn)
    report = {**run_header("prune", args, task),
              "test_accuracy_before": before, "test_accuracy_after": accuracy(model, split.test_x, split.test_y),
              "sparsity": masks.sparsity(), "per_tensor_sparsity": masks.per_tensor_sparsity(),
              "seconds": time.perf_counter() - start,
              "files": ["pruned.safetensors", "masks.safetensors", "report.json"]}
    print(f"pruned {args.model} with {args.method} to sparsity {masks.sparsity():.4f}: test accuracy "
          f"{100 * before:.1f}% -> {100 * report['test_accuracy_after']:.1f}%")
    with staged_output(out) as staging:
        save_weights(model.state_dict(), staging / "pruned.safetensors")
        save_weights(masks.state_dict(), staging / "masks.safetensors")
        write_json(staging / "report.json", report)
    print(f"written to {out}/: {', '.join(report['files'])}")
    return 0
