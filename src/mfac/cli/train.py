"""``mfac train``: train a built-in model, resumable after any kill.

Every ``--checkpoint-every`` steps (and at the end) the run writes ``checkpoint.pt`` into its
``--out`` folder, atomically (temporary file, fsync, rename): the model, the optimizer's whole
state (MFAC's window included), the data stream's position, the random state, the losses so far
and the run's settings. ``mfac train --resume DIR`` reloads it and continues; the final model is
then bit for bit the one an uninterrupted run would have produced. At the end the run writes
``model.safetensors`` and ``report.json``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from .. import checkpoint
from ..data import batches
from ..progress import Progress
from ..training import accuracy, mean_loss
from .common import CliError, RunError, check_out, make_optimizer, prepare, run_header, usage_errors, write_json

CHECKPOINT = "checkpoint.pt"
FORMAT = 1
# Settings a resumed run takes from its checkpoint; --steps, --checkpoint-every and --quiet may change.
RUN_SETTINGS = ("model", "data", "checkpoint", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "window",
                "damp", "seed")


def run(args) -> int:
    if args.resume:
        return _resume(args)
    out = check_out(args.out, "train", args.force)
    task, model, split = prepare(args)
    with usage_errors():
        opt = make_optimizer(args.optimizer, model.parameters(), args.lr, args.momentum, args.weight_decay,
                             args.window, args.damp)
    stream = batches(split.train_x, split.train_y, args.batch_size, torch.Generator().manual_seed(args.seed))
    progress = {"step": 0, "losses": [], "initial_train_loss": mean_loss(model, split.train_x, split.train_y),
                "seconds": 0.0, "resumed_at": []}
    out.mkdir(parents=True, exist_ok=True)
    return _train(args, out, task, model, split, opt, stream, progress)


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
        settings = saved["settings"]
    from .parser import build_parser  # the defaults tell which options the user set explicitly

    defaults = vars(build_parser().parse_args(["train"]))
    for key in RUN_SETTINGS:
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
    weights_file, args.checkpoint = args.checkpoint, None  # the model comes from the checkpoint
    task, model, split = prepare(args)
    args.checkpoint = weights_file
    with usage_errors(f"--resume {folder}: "):
        opt = make_optimizer(args.optimizer, model.parameters(), args.lr, args.momentum, args.weight_decay,
                             args.window, args.damp)
        try:
            model.load_state_dict(saved["model"])
        except RuntimeError as error:
            raise ValueError(f"the saved model does not fit --model {args.model}: {str(error)[:200]}") from None
        opt.load_state_dict(saved["optimizer"])
        stream = batches(split.train_x, split.train_y, args.batch_size, torch.Generator())
        stream.load_state_dict(saved["batches"])
        torch.set_rng_state(saved["torch_rng"])
    progress = {key: saved[key] for key in ("step", "losses", "initial_train_loss", "seconds", "resumed_at")}
    progress["resumed_at"] = [*progress["resumed_at"], saved["step"]]
    if not args.quiet:
        print(f"resuming {folder} at step {saved['step']} of {args.steps}")
    return _train(args, folder, task, model, split, opt, stream, progress)


def _save_checkpoint(out: Path, args, model, opt, stream, progress: dict) -> None:
    checkpoint.save({"format": FORMAT, "settings": {key: getattr(args, key) for key in (*RUN_SETTINGS, "steps")},
                     "model": model.state_dict(), "optimizer": opt.state_dict(), "batches": stream.state_dict(),
                     "torch_rng": torch.get_rng_state(), **progress}, out / CHECKPOINT)


def _train(args, out: Path, task, model: nn.Module, split, opt, stream, progress: dict) -> int:
    started = time.perf_counter()
    model.train()
    diverged = None
    with Progress(args.steps, f"train {args.model} with {args.optimizer}", args.quiet) as bar:
        bar.update(progress["step"])
        while progress["step"] < args.steps:
            inputs, targets = next(stream)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs), targets)
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
                _save_checkpoint(out, args, model, opt, stream, progress)
    progress["seconds"] += time.perf_counter() - started
    report = {**run_header("train", args, task), "steps_done": progress["step"],
              "initial_train_loss": progress["initial_train_loss"], "batch_losses": progress["losses"],
              "seconds": progress["seconds"], "resumed_at_steps": progress["resumed_at"], "diverged": diverged is not None}
    if diverged is not None:
        report.update(diverged_at_step=diverged, files=["report.json", CHECKPOINT])
        write_json(out / "report.json", report)
        raise RunError(f"training diverged at step {diverged} (the loss became NaN or Inf); the last good checkpoint "
                       f"and a report are in {out}/. Lower --lr (or raise --damp for MFAC) and start again")
    report.update(final_train_loss=mean_loss(model, split.train_x, split.train_y),
                  test_accuracy=accuracy(model, split.test_x, split.test_y),
                  files=["model.safetensors", "report.json", CHECKPOINT])
    checkpoint.save_weights(model.state_dict(), out / "model.safetensors")
    text = out / ".report.json.tmp"
    write_json(text, report)
    text.replace(out / "report.json")
    print(f"trained {args.model} on {task.description} with {args.optimizer} for {args.steps} steps: train loss "
          f"{report['initial_train_loss']:.4f} -> {report['final_train_loss']:.4f}, test accuracy "
          f"{100 * report['test_accuracy']:.1f}%")
    print(f"written to {out}/: {', '.join(report['files'])}")
    return 0
