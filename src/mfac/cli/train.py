"""``mfac train``: train a built-in model, or a local Hugging Face model on text, resumable after any kill.

MFAC's settings default to the model's recipe (:mod:`mfac.cli.optimizers`); before training the
run states the optimizer's memory and the size of one checkpoint and refuses what cannot fit
(:mod:`mfac.cli.budget`). Every ``--checkpoint-every`` steps (and at the end; never with 0) the run
writes ``checkpoint.pt`` into its ``--out`` folder, atomically (temporary file, fsync, rename): the
model, the optimizer's whole state (MFAC's window included), the data stream's position, the random
state, the losses so far and the run's settings. ``mfac train --resume DIR`` reloads it and
continues; the final model is then bit for bit the one an uninterrupted run would have produced.
At the end the run writes ``model.safetensors`` (a Hugging Face model: the folder ``model/``,
loadable by transformers), ``report.json`` and ``report.md``.
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
from ..resources import InsufficientMemoryError
from ..training import accuracy, mean_loss
from .budget import check_budget, human_bytes
from .errors import CliError, RunError, usage_errors
from .optimizers import fill_recipe, make_optimizer
from .output import check_out, load_run_checkpoint, take_run_settings
from .reports import run_header, unused_settings, write_json, write_markdown
from .tasks import load_model_weights, prepare

CHECKPOINT = "checkpoint.pt"
FORMAT = 1
# Settings a resumed run takes from its checkpoint; --steps, --checkpoint-every and --quiet may change.
RUN_SETTINGS = ("model", "data", "checkpoint", "batch_size", "max_length", "new_head", "optimizer", "lr", "momentum",
                "weight_decay", "window", "damp", "density", "window_dtype", "max_grad_norm", "seed")
# What runs from before a setting existed used instead.
LEGACY = {"max_length": 64, "new_head": False, "density": 1.0, "window_dtype": "float32", "max_grad_norm": 0.0}
MFAC_ONLY = ("window", "damp", "density", "window_dtype", "max_grad_norm")


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
    eval_name: str = "test"  # what the accuracy is measured on: test, dev or held-out texts
    train_samples: int = 0

    def train_step(self, optimizer) -> float:
        """One optimizer step on the next batch of the stream; returns the batch's loss."""
        batch = self.make_batch(next(self.stream))
        optimizer.zero_grad()
        loss = self.loss(self.model, batch)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def checkpoint_due(self, args, step: int) -> bool:
        """Whether a checkpoint is written after ``step``: every --checkpoint-every steps and at the end."""
        return bool(args.checkpoint_every) and (step % args.checkpoint_every == 0 or step == args.steps)


def make_job(args, load_weights: bool = True) -> Job:
    """The data, the model (with --checkpoint when ``load_weights``) and how to train and judge it."""
    generator = torch.Generator().manual_seed(args.seed)
    if args.model.startswith("hf:"):
        from .text import EVAL_SENTENCES, TextBatches, evaluate, load_hf_model, load_text_task, model_loss, save_hf

        task = load_text_task(args.data, args.seed)
        if not 1 <= args.batch_size <= len(task.train_texts):
            raise CliError(f"--batch-size must be in [1, {len(task.train_texts)}], got {args.batch_size}")
        torch.manual_seed(args.seed)
        model, tokenizer = load_hf_model(args.model, task, args.new_head)
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
                   lambda: evaluate(model, test_eval)[1], save, task.eval_name, len(task.train_texts))
    task, model, split = prepare(args, load_weights)

    def save(folder: Path) -> str:
        checkpoint.save_weights(model.state_dict(), folder / "model.safetensors")
        return "model.safetensors"

    return Job(task.description, model, batches(split.train_x, split.train_y, args.batch_size, generator),
               lambda raw: raw, lambda net, batch: nn.functional.cross_entropy(net(batch[0]), batch[1]),
               lambda: mean_loss(model, split.train_x, split.train_y),
               lambda: accuracy(model, split.test_x, split.test_y), save, "test", len(split.train_x))


def optimizer_settings(args) -> dict:
    """The keyword arguments of :func:`make_optimizer` from the (filled-in) settings of the run."""
    return dict(momentum=args.momentum, weight_decay=args.weight_decay, window=args.window, damp=args.damp,
                density=args.density, window_dtype=args.window_dtype, max_grad_norm=args.max_grad_norm)


def build_optimizer(args, job: Job, context: str = ""):
    """The run's optimizer over the model's trainable parameters; a density that the model is too
    small for, or memory the library finds missing, is a usage error in the flags' words."""
    trainable = [p for p in job.model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in trainable)
    if args.optimizer == "mfac" and args.density < 1 and dim <= args.window:
        raise CliError(f"{context}--density {args.density:g} (a compressed window) needs more coordinates than the "
                       f"window holds gradients, but --model {args.model} has {dim:,} and --window is {args.window}; "
                       f"pass --density 1 (a dense window costs no more for a model this small) or a smaller --window")
    with usage_errors(context):
        try:
            return make_optimizer(args.optimizer, trainable, args.lr, **optimizer_settings(args))
        except InsufficientMemoryError as error:
            raise CliError(f"{error} (flags: --window, --density, --window-dtype)") from None


def run(args) -> int:
    if args.resume:
        return _resume(args)
    out = check_out(args.out, "train", args.force)
    fill_recipe(args)
    job = make_job(args)
    budget = check_budget(job.model, args.optimizer, optimizer_settings(args), out, args.checkpoint_every,
                          args.quiet)
    opt = build_optimizer(args, job)
    progress = {"step": 0, "losses": [], "initial_train_loss": job.train_loss(), "seconds": 0.0, "resumed_at": [],
                "memory": budget}
    out.mkdir(parents=True, exist_ok=True)
    return _train(args, out, job, opt, progress)


def _load_saved(args, folder: Path) -> dict:
    """The checkpoint of the run in ``folder``, checked; no checkpoint is a usage error that says why."""
    saved = load_run_checkpoint(args, folder, CHECKPOINT, "mfac train")
    if not isinstance(saved, dict) or saved.get("format") != FORMAT or "kind" in saved:
        hint = " (a `mfac prune --gradual` run resumes with mfac prune --resume)" if isinstance(saved, dict) \
            and "kind" in saved else ""
        raise CliError(f"--resume {folder}: {folder / CHECKPOINT} is not a checkpoint of this version of mfac train{hint}")
    return saved


def _resume(args) -> int:
    folder = Path(args.resume)
    saved = _load_saved(args, folder)
    settings = {**LEGACY, **{key: None for key in RUN_SETTINGS if key not in LEGACY}, **saved["settings"]}
    take_run_settings(args, settings, RUN_SETTINGS, "mfac train")
    if args.steps < saved["step"]:
        raise CliError(f"--steps {args.steps} is fewer than the {saved['step']} steps the run has already taken")
    args.out = str(folder)
    job = make_job(args, load_weights=False)  # the model comes from the checkpoint
    opt = build_optimizer(args, job, f"--resume {folder}: ")
    with usage_errors(f"--resume {folder}: "):
        try:
            job.model.load_state_dict(saved["model"])
        except RuntimeError as error:
            raise ValueError(f"the saved model does not fit --model {args.model}: {str(error)[:200]}") from None
        opt.load_state_dict(saved["optimizer"])
        job.stream.load_state_dict(saved["batches"])
        torch.set_rng_state(saved["torch_rng"])
    progress = {key: saved[key] for key in ("step", "losses", "initial_train_loss", "seconds", "resumed_at")}
    progress["resumed_at"] = [*progress["resumed_at"], saved["step"]]
    progress["memory"] = check_budget(job.model, args.optimizer, optimizer_settings(args), folder,
                                      args.checkpoint_every, args.quiet)
    if not args.quiet:
        print(f"resuming {folder} at step {saved['step']} of {args.steps}")
    return _train(args, folder, job, opt, progress)


def _save_checkpoint(out: Path, args, job: Job, opt, progress: dict) -> None:
    kept = {key: value for key, value in progress.items() if key != "memory"}
    checkpoint.save({"format": FORMAT, "settings": {key: getattr(args, key) for key in (*RUN_SETTINGS, "steps")},
                     "model": job.model.state_dict(), "optimizer": opt.state_dict(), "batches": job.stream.state_dict(),
                     "torch_rng": torch.get_rng_state(), **kept}, out / CHECKPOINT)


def _loop(args, out: Path, job: Job, opt, progress: dict) -> int | None:
    """Train to --steps, checkpointing on the way; the step at which the loss became NaN/Inf, or None."""
    started = time.perf_counter()
    model = job.model
    model.train()
    with Progress(args.steps, f"train {args.model} with {args.optimizer}", args.quiet) as bar:
        bar.update(progress["step"])
        while progress["step"] < args.steps:
            value = job.train_step(opt)
            if not math.isfinite(value):
                progress["seconds"] += time.perf_counter() - started
                return progress["step"] + 1
            progress["losses"].append(value)
            progress["step"] += 1
            bar.update(1, loss=value)
            if job.checkpoint_due(args, progress["step"]):
                progress["seconds"] += time.perf_counter() - started
                started = time.perf_counter()
                _save_checkpoint(out, args, job, opt, progress)
    progress["seconds"] += time.perf_counter() - started
    return None


def _train(args, out: Path, job: Job, opt, progress: dict) -> int:
    diverged = _loop(args, out, job, opt, progress)
    kept = [CHECKPOINT] if (out / CHECKPOINT).is_file() else []
    report = {**run_header("train", args, job.description, unused_settings(args)), "evaluated_on": job.eval_name,
              "steps_done": progress["step"], "initial_train_loss": progress["initial_train_loss"],
              "batch_losses": progress["losses"], "seconds": progress["seconds"],
              "resumed_at_steps": progress["resumed_at"], "memory": progress["memory"],
              "diverged": diverged is not None}
    if diverged is not None:
        report.update(diverged_at_step=diverged, files=["report.json", *kept])
        write_json(out / "report.json", report)
        where = "the last good checkpoint and a report are" if kept else "a report is"
        raise RunError(f"training diverged at step {diverged} (the loss became NaN or Inf); {where} in {out}/. "
                       f"Lower --lr (or raise --damp for MFAC) and start again")
    report.update(final_train_loss=job.train_loss(), test_accuracy=job.test_accuracy())
    report["files"] = [job.save_model(out), "report.json", "report.md", *kept]
    _write_reports(out, report, job.eval_name)
    print(f"trained {args.model} on {job.description} with {args.optimizer} for {args.steps} steps: train loss "
          f"{report['initial_train_loss']:.4f} -> {report['final_train_loss']:.4f}, {job.eval_name} accuracy "
          f"{100 * report['test_accuracy']:.1f}%")
    print(f"written to {out}/: {', '.join(report['files'])}")
    return 0


def _write_reports(out: Path, report: dict, eval_name: str) -> None:
    memory = report["memory"]
    figures = [("steps", report["steps_done"]), ("initial train loss", f"{report['initial_train_loss']:.4f}"),
               ("final train loss", f"{report['final_train_loss']:.4f}"),
               (f"{eval_name} accuracy", f"{100 * report['test_accuracy']:.2f}%"),
               ("trainable coordinates", f"{memory['dim']:,}"),
               ("optimizer memory", human_bytes(memory["optimizer_bytes"])),
               ("one checkpoint", human_bytes(memory["checkpoint_bytes"])), ("seconds", f"{report['seconds']:.1f}")]
    if report["resumed_at_steps"]:
        figures.append(("resumed at steps", ", ".join(map(str, report["resumed_at_steps"]))))
    write_markdown(out / ".report.md.tmp", "mfac train", report, figures)
    (out / ".report.md.tmp").replace(out / "report.md")
    text = out / ".report.json.tmp"
    write_json(text, report)
    text.replace(out / "report.json")
