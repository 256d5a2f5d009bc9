"""What ``mfac prune`` prunes one-shot: a built-in model on its data, or a Hugging Face model on text,
with the data for OBS, the accuracy, the fixed inputs the size report measures on, and how to write
the pruned and the compacted model; and the checks both routes make of their flags against the
data and the model (``--num-grads``, ``--pattern``)."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import safetensors_torch, save_weights
from ..defaults import EXACT, PRUNE_NUM_GRADS
from ..prune import recalibrate_batchnorm
from ..prune.oneshot import resolve_params
from ..training import accuracy
from .compacted import save_compacted_model
from .errors import CliError, usage_errors
from .model_size import weights_bytes
from .tasks import load_model_weights, prepare

__all__ = ["PruneJob", "builtin_job", "text_job", "dense_bytes", "first_sample", "PRUNED_FILE", "resolve_num_grads",
           "check_pattern", "block_size", "sparse_name"]

PRUNED_FILE = "pruned.safetensors"  # the pruned built-in model, one-shot or --gradual (hf: models: model/)


@dataclass
class PruneJob:
    description: str
    model: nn.Module
    data: list
    loss_fn: object
    batch_loss: object
    params: object  # the parameters of unstructured pruning (None: the library's default)
    accuracy: object  # () -> test accuracy
    after: object  # () -> None, run after pruning
    save: object  # (folder) -> the name written
    inputs: object  # the fixed batch of --batch-size inputs that latency is measured on
    save_compacted: object  # (folder, structure sizes) -> (name written, how to load it, "mfac" | "transformers")
    eval_name: str = "test"  # what the accuracy is measured on: test, dev or held-out texts


def block_size(args) -> int | str:
    """``--block-size``, with 0 spelled as the library spells the exact (unblocked) inverse."""
    return EXACT if args.block_size == 0 else args.block_size


def sparse_name(dense_name: str) -> str:
    """pruned.safetensors -> pruned.sparse.safetensors; a folder model/ -> model.sparse.safetensors."""
    return dense_name.rstrip("/").removesuffix(".safetensors") + ".sparse.safetensors"


def resolve_num_grads(args, samples: int, batches: int, default: int) -> None:
    """Set ``args.num_grads``: left out, ``default`` or all the data holds if fewer; given, refused
    (a usage error with the numbers and the fix) when it asks for more gradients per inverse than
    the data holds: more samples than there are (--per-sample), or more mini-batches than the
    training data makes without repeating one."""
    if args.method != "obs":
        args.num_grads = args.num_grads or default
        return
    limit = samples if args.per_sample else batches
    if args.num_grads is None:
        args.num_grads = min(default, limit)
        return
    if args.num_grads <= limit:
        return
    if args.per_sample:
        raise CliError(f"--num-grads {args.num_grads} asks for {args.num_grads:,} per-sample gradients per inverse, "
                       f"but the training data holds {samples:,} samples; pass --num-grads {samples} or fewer")
    other = f", or --per-sample for up to {samples:,} (one gradient per sample)" if args.num_grads <= samples else ""
    raise CliError(f"--num-grads {args.num_grads} asks for {args.num_grads:,} mini-batch gradients per inverse, but "
                   f"the {samples:,} training samples make {batches:,} batches of --batch-size {args.batch_size} "
                   f"(more would repeat batches); pass --num-grads {batches} or fewer{other}")


def check_pattern(model: nn.Module, params, nm: tuple[int, int] | None, pattern: str | None) -> None:
    """--pattern N:M needs every pruned tensor's rows to divide by M: refused before any work, in
    the command's words, with an M that would do."""
    if nm is None:
        return
    with usage_errors("--model: "):
        chosen = resolve_params(model, params)
    rows = {name: p[0].numel() if p.dim() >= 2 else 0 for name, p in chosen.items()}
    bad = [name for name, length in rows.items() if length == 0 or length % nm[1]]
    if not bad:
        return
    common = math.gcd(*rows.values())
    fits = [m for m in (4, 8, 2) if common and common % m == 0]
    hint = f" such as --pattern {fits[0] // 2}:{fits[0]}" if fits else ""
    more = f" (and {len(bad) - 1} more layer{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
    raise CliError(f"--pattern {pattern} needs rows whose length divides by {nm[1]}, but {bad[0]} has rows of "
                   f"{rows[bad[0]]} weights{more}; choose an "
                   f"N:M whose M divides every pruned layer's rows{hint}, or prune without --pattern")


def first_sample(inputs):
    """The first input of a batch, as a batch of one (a tensor, or a dict of tensors)."""
    if isinstance(inputs, dict):
        return {key: value[:1] for key, value in inputs.items()}
    return inputs[:1]


def dense_bytes(model: nn.Module, hf_model: bool) -> int:
    """Bytes on disk of ``model`` written as the command writes it (safetensors; a Hugging Face
    folder's weights), measured without leaving a file behind."""
    if not hf_model:
        state = {name: value.detach().to("cpu").contiguous() for name, value in model.state_dict().items()}
        return len(safetensors_torch().save(state))
    with tempfile.TemporaryDirectory(prefix="mfac-size-") as folder:
        model.save_pretrained(folder, safe_serialization=True)
        return weights_bytes(Path(folder))


def builtin_job(args) -> PruneJob:
    task, model, split = prepare(args)
    data = [(split.train_x[i:i + args.batch_size], split.train_y[i:i + args.batch_size])
            for i in range(0, len(split.train_x) - args.batch_size + 1, args.batch_size)]
    resolve_num_grads(args, len(data) * args.batch_size, len(data), PRUNE_NUM_GRADS)
    inputs = split.test_x[torch.arange(args.batch_size) % len(split.test_x)]

    def calibrate():
        if args.calibrate_bn:
            recalibrate_batchnorm(model, data, args.calibrate_bn)

    def save(folder):
        save_weights(model.state_dict(), folder / PRUNED_FILE)
        return PRUNED_FILE

    def save_compacted(folder, sizes):
        save_compacted_model(model, folder / "compacted.safetensors", args.model, task.image_shape, task.num_classes,
                             sizes)
        return "compacted.safetensors", "mfac.cli.compacted.load_compacted_model(PATH)", "mfac"

    calibrate()  # the dense model gets the same BatchNorm treatment as the pruned one
    return PruneJob(task.description, model, data, nn.functional.cross_entropy, None, None,
                    lambda: accuracy(model, split.test_x, split.test_y), calibrate, save, inputs, save_compacted)


def _fixed_length(max_length: int, tokenizer, config) -> int:
    """Tokens per text of the fixed batch: --max-length, within what the model takes."""
    limits = [max_length, getattr(config, "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    return min(int(limit) for limit in limits if isinstance(limit, int) and limit > 0)


def text_job(args) -> PruneJob:
    from ..hf import default_pruning_params
    from .text import TextBatches, evaluate, load_hf_model, load_text_task, model_loss, save_hf

    task = load_text_task(args.data, args.seed)
    samples = len(task.train_texts)
    resolve_num_grads(args, samples, math.ceil(samples / args.batch_size), PRUNE_NUM_GRADS)
    torch.manual_seed(args.seed)
    model, tokenizer = load_hf_model(args.model, task, args.new_head)
    if args.checkpoint:
        load_model_weights(model, args.checkpoint, args.model)
    train = TextBatches(tokenizer, task.train_texts, task.train_labels, args.max_length)
    order = torch.randperm(len(task.train_texts), generator=torch.Generator().manual_seed(args.seed))
    needed = args.num_grads if args.per_sample else args.num_grads * args.batch_size
    data = [train.batch(order[i:i + args.batch_size]) for i in range(0, min(len(order), needed), args.batch_size)]
    test = TextBatches(tokenizer, task.test_texts, task.test_labels, args.max_length).in_order(64)
    params = None
    if not args.structure:
        with usage_errors("--model: "):
            params = default_pruning_params(model)
    texts = [task.test_texts[i % len(task.test_texts)] for i in range(args.batch_size)]
    inputs = dict(tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt",
                            max_length=_fixed_length(args.max_length, tokenizer, model.config)))

    def save(folder):
        save_hf(model, tokenizer, folder / "model")
        return "model/"

    def save_compacted(folder, sizes):
        from ..hf_compact import save_compacted as save_folder

        loads_in = save_folder(model, folder / "compacted", tokenizer)
        loader = "transformers.AutoModelForSequenceClassification.from_pretrained(PATH)" \
            if loads_in == "transformers" else "mfac.hf_compact.load_compacted(PATH)"
        return "compacted/", loader, loads_in

    return PruneJob(task.description, model, data, None, model_loss, params, lambda: evaluate(model, test)[1],
                    lambda: None, save, inputs, save_compacted, task.eval_name)
