"""``mfac train``: train a built-in model, or a local Hugging Face model on text, resumable after any kill.

Every ``--checkpoint-every`` steps (and at the end) the run writes ``checkpoint.pt`` into its
``--out`` folder, atomically (temporary file, fsync, rename): the model, the optimizer's whole
state (MFAC's window included), the data stream's position, the random state, the losses so far
and the run's settings. ``mfac train --resume DIR`` reloads it and continues; the final model is
then bit for bit the one an uninterrupted run would have produced. At the end the run writes
``model.safetensors`` (a Hugging Face model: the folder ``model/``, loadable by transformers) and
``report.json``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import checkpoint
from ..data import batches
from ..progress import Progress
from ..training import accuracy, mean_loss
from .errors import CliError, RunError, usage_errors
from .optimizers import make_optimizer
from .output import check_out
from .reports import run_header, write_json
from .tasks import load_model_weights, prepare

CHECKPOINT = "checkpoint.pt"
FORMAT = 1
# Settings a resumed run takes from its checkpoint; --steps, --checkpoint-every and --quiet may change.
RUN_SETTINGS = ("model", "data", "checkpoint", "batch_size", "max_length", "optimizer", "lr", "momentum",
                "weight_decay", "window", "damp", "seed")


@dataclass
class Job:
    """What the training loop needs, for a built-in model on tensors or a Hugging Face model on text."""

    description: str
    model: nn.Module
    stream: object  # a ShuffledBatches: next() gives a raw batch; state_dict() saves its position
    make_batch: Callable  # raw batch -> the model's batch
    loss: Callable  # loss(model, batch) -> scalar
    train_loss: Callable[[], float]
    test_accuracy: Callable[[], float]
    save_model: Callable[[Path], str]  # writes the final model into a folder; returns the file's name


def make_job(args, load_weights: bool = True) -> Job:
    """The data, the model (with --checkpoint when ``load_weights``) and how to train and judge it."""
    generator = torch.Generator().manual_seed(args.seed)
    if args.model.startswith("hf:"):
        from .text import EVAL_SENTENCES, TextBatches, evaluate, load_hf_model, load_text_task, model_loss, save_hf

        task = load_text_task(args.data, args.seed)
        if not 1 <= args.batch_size <= len(task.train_texts):
            raise CliError(f"--batch-size must be in [1, {len(task.train_texts)}], got {args.batch_size}")
        torch.manual_seed(args.seed)
        model, tokenizer = load_hf_model(args.model, task.num_labels)
        if load_weights and args.checkpoint:
            load_model_weights(model, args.checkpoint, args.model)
        train = TextBatches(tokenizer, task.train_texts, task.train_labels, args.max_length)
        test = TextBatches(tokenizer, task.test_texts, task.test_labels, args.max_length)
        train_eval, test_eval = train.in_order(64, EVAL_SENTENCES), test.in_order(64)
        index = torch.arange(len(task.train_texts))

        def save(folder: Path) -> str:
            save_hf(model, tokenizer, folder / "model")
            return "model/"

        return Job(task.description, model, batches(index, index, args.batch_size, generator),
                   lambda raw: train.batch(raw[0]), model_loss, lambda: evaluate(model, train_eval)[0],
                   lambda: evaluate(model, test_eval)[1], save)
    task, model, split = prepare(args, load_weights)

    def save(folder: Path) -> str:
        checkpoint.save_weights(model.state_dict(), folder / "model.safetensors")
        return "model.safetensors"

    return Job(task.description, model, batches(split.train_x, split.train_y, args.batch_size, generator),
               lambda raw: raw, lambda net, batch: nn.functional.cross_entropy(net(batch[0]), batch[1]),
               lambda: mean_loss(model, split.train_x, split.train_y),
               lambda: accuracy(model, split.test_x, split.test_y), save)


def run(args) -> int:
    if args.resume:
        return _resume(args)
    out = check_out(args.out, "train", args.force)
    job = make_job(args)
    with usage_errors():
        opt = make_optimizer(args.optimizer, job.model.parameters(), args.lr, args.momentum, args.weight_decay,
                             args.window, args.damp)
    progress = {"step": 0, "losses": [], "initial_train_loss": job.train_loss(), "seconds": 0.0, "resumed_at": []}
    out.mkdir(parents=True, exist_ok=True)
    return _train(args, out, job, opt, progress)


def _resume(args) -> int:
    folder = Path(args.resume)
    path = folder / CHECKPOINT
    if not path.is_file():
        raise CliError(f"--resume {folder}: no {CHECKPOINT} there; it must be the --out folder of an earlier "
                       f"`mfac train` run")
    if args.out is not None and Path(args.out).resolve() != folder.resolve():
        raise CliError(f"--resume writes into the run's own folder {folder}; leave out --out (or give the same folder)")
    with usage_errors(f"--resume {folder}: "):
        saved = checkpoint.load(path)
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise ValueError(f"{path} is not a checkpoint of this version of mfac train")
        settings = {**{key: None for key in RUN_SETTINGS}, **saved["settings"]}
    defaults = args.option_defaults  # from the parser: they tell which options the user set explicitly
    for key in RUN_SETTINGS:
        if settings[key] is None and key == "max_length":  # a run from before text support
            settings[key] = defaults[key]
        given = getattr(args, key)
        if given != defaults[key] and given != settings[key]:
            raise CliError(f"--{key.replace('_', '-')} {given} differs from the resumed run's {settings[key]}; "
                           f"--resume continues with the run's own settings (only --steps, --checkpoint-every and "
                           f"--quiet may change)")
        setattr(args, key, settings[key])
    if args.steps == defaults["steps"]:
        args.steps = settings["steps"]
    if args.steps < saved["step"]:
        raise CliError(f"--steps {args.steps} is fewer than the {saved['step']} steps the run has already taken")
    args.out = str(folder)
    job = make_job(args, load_weights=False)  # the model comes from the checkpoint
    with usage_errors(f"--resume {folder}: "):
        opt = make_optimizer(args.optimizer, job.model.parameters(), args.lr, args.momentum, args.weight_decay,
                             args.window, args.damp)
        try:
            job.model.load_state_dict(saved["model"])
        except RuntimeError as error:
            raise ValueError(f"the saved model does not fit --model {args.model}: {str(error)[:200]}") from None
        opt.load_state_dict(saved["optimizer"])
        job.stream.load_state_dict(saved["batches"])
        torch.set_rng_state(saved["torch_rng"])
    progress = {key: saved[key] for key in ("step", "losses", "initial_train_loss", "seconds", "resumed_at")}
    progress["resumed_at"] = [*progress["resumed_at"], saved["step"]]
    if not args.quiet:
        print(f"resuming {folder} at step {saved['step']} of {args.steps}")
    return _train(args, folder, job, opt, progress)


def _save_checkpoint(out: Path, args, job: Job, opt, progress: dict) -> None:
    checkpoint.save({"format": FORMAT, "settings": {key: getattr(args, key) for key in (*RUN_SETTINGS, "steps")},
                     "model": job.model.state_dict(), "optimizer": opt.state_dict(), "batches": job.stream.state_dict(),
                     "torch_rng": torch.get_rng_state(), **progress}, out / CHECKPOINT)


def _train(args, out: Path, job: Job, opt, progress: dict) -> int:
    started = time.perf_counter()
    model = job.model
    model.train()
    diverged = None
    with Progress(args.steps, f"train {args.model} with {args.optimizer}", args.quiet) as bar:
        bar.update(progress["step"])
        while progress["step"] < args.steps:
            batch = job.make_batch(next(job.stream))
            opt.zero_grad()
            loss = job.loss(model, batch)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                diverged = progress["step"] + 1
                break
            progress["losses"].append(value)
            progress["step"] += 1
            bar.update(1, loss=value)
            if progress["step"] % args.checkpoint_every == 0 or progress["step"] == args.steps:
                progress["seconds"] += time.perf_counter() - started
                started = time.perf_counter()
                _save_checkpoint(out, args, job, opt, progress)
    progress["seconds"] += time.perf_counter() - started
    report = {**run_header("train", args, job.description), "steps_done": progress["step"],
              "initial_train_loss": progress["initial_train_loss"], "batch_losses": progress["losses"],
              "seconds": progress["seconds"], "resumed_at_steps": progress["resumed_at"], "diverged": diverged is not None}
    if diverged is not None:
        report.update(diverged_at_step=diverged, files=["report.json", CHECKPOINT])
        write_json(out / "report.json", report)
        raise RunError(f"training diverged at step {diverged} (the loss became NaN or Inf); the last good checkpoint "
                       f"and a report are in {out}/. Lower --lr (or raise --damp for MFAC) and start again")
    report.update(final_train_loss=job.train_loss(), test_accuracy=job.test_accuracy())
    report["files"] = [job.save_model(out), "report.json", CHECKPOINT]
    text = out / ".report.json.tmp"
    write_json(text, report)
    text.replace(out / "report.json")
    print(f"trained {args.model} on {job.description} with {args.optimizer} for {args.steps} steps: train loss "
          f"{report['initial_train_loss']:.4f} -> {report['final_train_loss']:.4f}, test accuracy "
          f"{100 * report['test_accuracy']:.1f}%")
    print(f"written to {out}/: {', '.join(report['files'])}")
    return 0
