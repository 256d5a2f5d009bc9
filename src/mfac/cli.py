"""The ``mfac`` command: the demo on bundled data, training and pruning with built-in models, and
the benchmarks' quick mode. ``python -m mfac`` is the same program.

    mfac demo [--out DIR] [--quick] [--seed N]
    mfac train --model mlp --data digits --optimizer mfac --steps 500 --out DIR
    mfac prune --model mlp --data digits --checkpoint DIR/model.pt --sparsity 0.9 --out DIR2
    mfac bench

Errors end with one line on stderr and exit status 2 (1 for a failed benchmark, 130 for Ctrl-C);
set MFAC_DEBUG=1 to see the traceback instead. Reports are written under a temporary name and
renamed when complete, so an interrupted run leaves no half-written report.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .data import Split, load_digits, read_cifar_npz, read_mnist_idx
from .models import load_checkpoint, mlp, resnet20, small_cnn
from .optim import MFAC
from .progress import Progress
from .prune import prune_oneshot, recalibrate_batchnorm
from .prune.oneshot import parse_pattern
from .training import accuracy, mean_loss, train_classifier

__all__ = ["main"]


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the uninformative None and False ones."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Data and models ---------------------------------------------------------------------------------

@dataclass
class Task:
    split: Split
    image_shape: tuple[int, ...]  # (C, H, W) of one input
    num_classes: int
    description: str


def load_task(spec: str, seed: int, test_fraction: float = 0.2) -> Task:
    """digits | mnist-idx:PATH (a folder with the IDX files, or the images file) | cifar-npz:PATH."""
    kind, _, path = spec.partition(":")
    if kind == "digits" and not path:
        split = load_digits(seed=seed, images=True)
        return Task(split, (1, 8, 8), 10, "scikit-learn digits (1,797 8x8 images)")
    if kind == "mnist-idx" and path:
        images_path, labels_path = _mnist_files(Path(path))
        x, y = read_mnist_idx(images_path, labels_path)
        return Task(_random_split(x, y, seed, test_fraction), (1, 28, 28), 10, f"MNIST IDX {images_path}")
    if kind == "cifar-npz" and path:
        x, y = read_cifar_npz(path)
        return Task(_random_split(x, y, seed, test_fraction), (3, 32, 32), 10, f"CIFAR-10 npz {path}")
    raise CliError(f"unknown --data {spec!r}: use digits, mnist-idx:PATH or cifar-npz:PATH")


def _mnist_files(path: Path) -> tuple[Path, Path]:
    if path.is_file():
        labels = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
        return path, labels
    if not path.is_dir():
        raise FileNotFoundError(f"no such MNIST folder or file: {path}")
    images = sorted(path.glob("*images-idx3-ubyte*"))
    labels = sorted(path.glob("*labels-idx1-ubyte*"))
    if not images or not labels:
        raise FileNotFoundError(f"{path} has no *images-idx3-ubyte* and *labels-idx1-ubyte* files")
    return images[0], labels[0]


def _random_split(x, y, seed, test_fraction) -> Split:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    return Split(x[order[n_test:]], y[order[n_test:]], x[order[:n_test]], y[order[:n_test]])


MODELS = ("mlp", "cnn", "resnet20")


def build_model(name: str, task: Task) -> nn.Module:
    channels, height, width = task.image_shape
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), *mlp(channels * height * width, (64,), task.num_classes))
    if name == "cnn":
        return small_cnn(task.num_classes, in_channels=channels)
    if name == "resnet20":
        if task.image_shape != (3, 32, 32):
            raise CliError(f"resnet20 needs 3x32x32 images (cifar-npz data), but {task.description} has "
                           f"{'x'.join(map(str, task.image_shape))}")
        return resnet20(task.num_classes)
    raise CliError(f"unknown --model {name!r}: use one of {', '.join(MODELS)}")


def load_weights(model: nn.Module, path: str, model_name: str) -> None:
    try:
        load_checkpoint(model, path)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise CliError(f"checkpoint {path} does not fit --model {model_name}: "
                       f"{' '.join(line.strip() for line in first[:3])[:300]}") from None


def make_optimizer(name: str, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, window: int = 64,
                   damp: float = 1e-2):
    if name == "mfac":
        return MFAC(params, lr=lr, window=window, damp=damp, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise CliError(f"unknown --optimizer {name!r}: use mfac, adam or sgd")


# Output ------------------------------------------------------------------------------------------

def default_out(command: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("mfac-runs") / f"{command}-{stamp}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


@contextmanager
def staged_output(out: Path):
    """Yield a temporary folder beside ``out``; on success move its files into ``out`` (each by an
    atomic rename, ``report.json`` last); on any failure or Ctrl-C remove it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        out.mkdir(parents=True, exist_ok=True)
        for item in sorted(staging.iterdir(), key=lambda p: p.name == "report.json"):
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def environment(seed: int) -> dict:
    return {"mfac": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "threads": torch.get_num_threads(), "seed": seed}


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _plt():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# demo --------------------------------------------------------------------------------------------

DEMO = {
    "full": dict(steps=800, eval_every=40, sparsities=[0.5, 0.7, 0.8, 0.9, 0.95], recompute=16, num_grads=256,
                 finetune_steps=300),
    "quick": dict(steps=200, eval_every=20, sparsities=[0.5, 0.8, 0.9], recompute=8, num_grads=128,
                  finetune_steps=100),
}
DEMO_OPTIMIZERS = {  # the README's recommended settings
    "MFAC": dict(name="mfac", lr=3e-3, momentum=0.9, window=64, damp=1e-2),
    "Adam": dict(name="adam", lr=3e-3),
    "SGD": dict(name="sgd", lr=3e-2, momentum=0.9),
}


def run_demo(args) -> int:
    mode = "quick" if args.quick else "full"
    settings = DEMO[mode]
    out = Path(args.out) if args.out else default_out("demo")
    started = time.perf_counter()
    task = load_task("digits", args.seed)
    split = task.split
    flat = split.flattened()
    report = {"command": "demo", "mode": mode, "environment": environment(args.seed),
              "data": {"name": "digits", "train": len(flat.train_x), "test": len(flat.test_x)},
              "model": "MLP 64-64-10", "settings": {**settings, "optimizers": DEMO_OPTIMIZERS},
              "training": {}, "pruning": {}, "finetune": {}, "timings_s": {}, "files": {}}
    trained = {}
    for name, opt_settings in DEMO_OPTIMIZERS.items():
        torch.manual_seed(args.seed)
        model = mlp(64, (64,))
        opt = make_optimizer(params=model.parameters(), **opt_settings)
        curve = [(0, mean_loss(model, flat.train_x, flat.train_y))]
        start = time.perf_counter()
        with Progress(settings["steps"], f"train {name}", args.quiet) as bar:
            def on_step(step, loss):
                bar.update(1, loss=loss)
                if (step + 1) % settings["eval_every"] == 0:
                    curve.append((step + 1, mean_loss(model, flat.train_x, flat.train_y)))
            train_classifier(model, flat.train_x, flat.train_y, opt, settings["steps"], seed=args.seed, on_step=on_step)
        report["training"][name] = {
            "final_train_loss": curve[-1][1], "initial_train_loss": curve[0][1],
            "test_accuracy": accuracy(model, flat.test_x, flat.test_y), "seconds": time.perf_counter() - start,
            "curve": [{"step": s, "train_loss": v} for s, v in curve]}
        trained[name] = model
    report["timings_s"]["training"] = sum(r["seconds"] for r in report["training"].values())

    base = trained["MFAC"]
    report["pruning"]["pruned_model"] = "the MLP trained with MFAC"
    report["pruning"]["dense_test_accuracy"] = accuracy(base, flat.test_x, flat.test_y)
    data = [(flat.train_x[i:i + 32], flat.train_y[i:i + 32]) for i in range(0, len(flat.train_x) - 31, 32)]
    targets = [*settings["sparsities"], "2:4"]
    start = time.perf_counter()
    curves, sparse_for_finetune = {"magnitude": [], "obs": []}, None
    for method in ("magnitude", "obs"):
        for target in targets:
            model = copy.deepcopy(base)
            pattern = target if isinstance(target, str) else None
            label = f"{method} {target if pattern else f'{target:.0%}'}"
            sub_steps = (min(settings["recompute"], 2) if pattern else settings["recompute"]) if method == "obs" else 1
            with _pruning_progress(method, sub_steps, settings["num_grads"], f"prune {label}", args.quiet) as hooks:
                masks = prune_oneshot(model, None if pattern else target, data, nn.functional.cross_entropy,
                                      method=method, pattern=pattern, num_grads=settings["num_grads"],
                                      recompute=settings["recompute"], **hooks)
            curves[method].append({"target": str(target), "sparsity": masks.sparsity(),
                                   "test_accuracy": accuracy(model, flat.test_x, flat.test_y)})
            if method == "obs" and target == 0.9:
                sparse_for_finetune = (model, masks)
    report["pruning"]["curves"] = curves
    report["timings_s"]["pruning"] = time.perf_counter() - start

    if sparse_for_finetune is not None and settings["finetune_steps"]:
        model, masks = sparse_for_finetune
        before = accuracy(model, flat.test_x, flat.test_y)
        handle = masks.attach(model)
        opt = MFAC(model.parameters(), lr=1e-3, window=64, damp=1e-2, momentum=0.9)
        start = time.perf_counter()
        with Progress(settings["finetune_steps"], "fine-tune OBS 90%", args.quiet) as bar:
            train_classifier(model, flat.train_x, flat.train_y, opt, settings["finetune_steps"], seed=args.seed,
                             on_step=lambda step, loss: bar.update(1, loss=loss))
        handle.remove()
        zeros = sum(int((dict(model.named_parameters())[n][~m] == 0).sum()) for n, m in masks.items())
        report["finetune"] = {"model": "OBS 90%", "optimizer": "MFAC lr 1e-3, window 64, damp 1e-2, momentum 0.9",
                              "steps": settings["finetune_steps"], "test_accuracy_before": before,
                              "test_accuracy_after": accuracy(model, flat.test_x, flat.test_y),
                              "pruned_weights_still_zero": zeros == sum(int((~m).sum()) for m in masks.values()),
                              "sparsity": masks.sparsity()}
        report["timings_s"]["finetune"] = time.perf_counter() - start

    with staged_output(out) as staging:
        report["files"] = _demo_files(staging, report)
        report["timings_s"]["total"] = time.perf_counter() - started
        (staging / "report.md").write_text(_demo_markdown(report))
        write_json(staging / "report.json", report)
    _print_demo_summary(report, out)
    return 0


@contextmanager
def _pruning_progress(method: str, sub_steps: int, num_grads: int, desc: str, quiet: bool):
    """One bar for a pruning call: OBS counts gradient rows (the slow part) over all sub-steps and
    shows the sparsity reached; magnitude has a single step."""
    if method != "obs":
        with Progress(1, desc, quiet) as bar:
            yield {"callback": lambda done, total, sparsity: bar.update(1, sparsity=sparsity)}
        return
    with Progress(sub_steps * num_grads, f"{desc}, gradients", quiet) as bar:
        state = {"sparsity": 0.0}

        def on_rows(n):
            bar.update(n, sparsity=state["sparsity"])

        def after_step(done, total, sparsity):
            state["sparsity"] = sparsity

        yield {"callback": after_step, "on_gradient_rows": on_rows}


def _demo_files(folder: Path, report: dict) -> dict:
    plt = _plt()
    if plt is None:
        return {"report": "report.json", "summary": "report.md",
                "plots": "not written: matplotlib is not installed (pip install 'mfac[cli]')"}
    def save(fig, ax, xlabel, ylabel, title, name):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in report["training"].items():
        ax.plot([p["step"] for p in result["curve"]], [p["train_loss"] for p in result["curve"]], label=name)
    ax.set_yscale("log")
    save(fig, ax, "step", "training loss (full training set)", "digits MLP: training loss", "loss_curves.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, points in report["pruning"]["curves"].items():
        unstructured = [p for p in points if p["target"] != "2:4"]
        line, = ax.plot([100 * p["sparsity"] for p in unstructured], [100 * p["test_accuracy"] for p in unstructured],
                        "o-", label="OBS (M-FAC)" if method == "obs" else "magnitude")
        nm = [p for p in points if p["target"] == "2:4"]
        ax.plot([100 * p["sparsity"] for p in nm], [100 * p["test_accuracy"] for p in nm], "s",
                color=line.get_color(), markerfacecolor="none", markersize=9)
    ax.axhline(100 * report["pruning"]["dense_test_accuracy"], color="gray", linestyle="--", label="dense")
    save(fig, ax, "sparsity % (open squares: 2:4)", "test accuracy %", "digits MLP: one-shot pruning", "pruning.png")
    return {"report": "report.json", "summary": "report.md", "plots": ["loss_curves.png", "pruning.png"]}


def _demo_markdown(report: dict) -> str:
    training = markdown_table(
        ["optimizer", "settings", "initial train loss", "final train loss", "test accuracy %", "seconds"],
        [[name, ", ".join(f"{k} {v}" for k, v in report["settings"]["optimizers"][name].items() if k != "name"),
          f"{r['initial_train_loss']:.3f}", f"{r['final_train_loss']:.4f}", f"{100 * r['test_accuracy']:.1f}",
          f"{r['seconds']:.1f}"] for name, r in report["training"].items()])
    curves = report["pruning"]["curves"]
    pruning = markdown_table(
        ["target", "sparsity", "magnitude accuracy %", "OBS accuracy %"],
        [[m["target"], f"{m['sparsity']:.3f}", f"{100 * m['test_accuracy']:.1f}", f"{100 * o['test_accuracy']:.1f}"]
         for m, o in zip(curves["magnitude"], curves["obs"])])
    parts = [f"# mfac demo ({report['mode']})", "",
             f"Data: scikit-learn digits, {report['data']['train']} training and {report['data']['test']} test images. "
             f"Model: {report['model']}. Seed {report['environment']['seed']}; mfac {report['environment']['mfac']}, "
             f"torch {report['environment']['torch']}.", "",
             f"## Training ({report['settings']['steps']} steps of 32 samples)", "", training, "",
             f"## One-shot pruning of {report['pruning']['pruned_model']} "
             f"(dense: {100 * report['pruning']['dense_test_accuracy']:.1f}%)", "",
             f"OBS: {report['settings']['num_grads']} mini-batch gradients, block 128, "
             f"{report['settings']['recompute']} recomputations.", "", pruning, ""]
    if report["finetune"]:
        f = report["finetune"]
        parts += ["## Fine-tuning the 90% OBS model with its masks attached", "",
                  f"{f['steps']} steps of {f['optimizer']}: test accuracy {100 * f['test_accuracy_before']:.1f}% -> "
                  f"{100 * f['test_accuracy_after']:.1f}%, sparsity {f['sparsity']:.3f}, pruned weights still zero: "
                  f"{f['pruned_weights_still_zero']}.", ""]
    parts += [f"Total time {report['timings_s']['total']:.1f} s."]
    return "\n".join(parts) + "\n"


def _print_demo_summary(report: dict, out: Path) -> None:
    print(f"mfac demo ({report['mode']}) on scikit-learn digits, seed {report['environment']['seed']}")
    print(f"{'optimizer':<8} {'final train loss':>17} {'test acc':>9}")
    for name, r in report["training"].items():
        print(f"{name:<8} {r['final_train_loss']:>17.4f} {100 * r['test_accuracy']:>8.1f}%")
    print(f"\n{'pruning':<8} {'sparsity':>9} {'magnitude':>10} {'OBS':>7}")
    curves = report["pruning"]["curves"]
    for m, o in zip(curves["magnitude"], curves["obs"]):
        print(f"{m['target']:<8} {m['sparsity']:>9.3f} {100 * m['test_accuracy']:>9.1f}% {100 * o['test_accuracy']:>6.1f}%")
    if report["finetune"]:
        f = report["finetune"]
        print(f"\nfine-tuned OBS 90%: {100 * f['test_accuracy_before']:.1f}% -> {100 * f['test_accuracy_after']:.1f}%")
    print(f"\nwritten to {out}/: report.json, report.md"
          + (", loss_curves.png, pruning.png" if isinstance(report["files"]["plots"], list) else
             f" ({report['files']['plots']})") + f"  [{report['timings_s']['total']:.1f} s]")


# train / prune -----------------------------------------------------------------------------------

def _check_range(name, value, low, high, high_open=True):
    if not (low <= value < high if high_open else low <= value <= high):
        raise CliError(f"--{name} must be in [{low}, {high}{')' if high_open else ']'}, got {value}")


def _prepare(args) -> tuple[Task, nn.Module, Split]:
    task = load_task(args.data, args.seed)
    model = build_model(args.model, task)
    if args.checkpoint:
        load_weights(model, args.checkpoint, args.model)
    split = task.split
    if args.model == "mlp":
        split = split.flattened()
    return task, model, split


def run_train(args) -> int:
    if args.steps < 1:
        raise CliError(f"--steps must be >= 1, got {args.steps}")
    out = Path(args.out) if args.out else default_out("train")
    torch.manual_seed(args.seed)
    task, model, split = _prepare(args)
    opt = make_optimizer(args.optimizer, model.parameters(), args.lr, args.momentum, args.weight_decay,
                         args.window, args.damp)
    initial = mean_loss(model, split.train_x, split.train_y)
    start = time.perf_counter()
    with Progress(args.steps, f"train {args.model} with {args.optimizer}", args.quiet) as bar:
        losses = train_classifier(model, split.train_x, split.train_y, opt, args.steps, args.batch_size, args.seed,
                                  on_step=lambda step, loss: bar.update(1, loss=loss))
    report = {**_run_header("train", args, task),
              "initial_train_loss": initial, "final_train_loss": mean_loss(model, split.train_x, split.train_y),
              "test_accuracy": accuracy(model, split.test_x, split.test_y), "seconds": time.perf_counter() - start,
              "batch_losses": losses}
    print(f"trained {args.model} on {task.description} with {args.optimizer} for {args.steps} steps: train loss "
          f"{initial:.4f} -> {report['final_train_loss']:.4f}, test accuracy {100 * report['test_accuracy']:.1f}%")
    _save_run(out, {"model.pt": model.state_dict()}, report)
    return 0


def _run_header(command: str, args, task: Task) -> dict:
    return {"command": command, "environment": environment(args.seed), "data": task.description, "model": args.model,
            "settings": {k: v for k, v in vars(args).items() if k not in ("func", "quiet")}}


def _save_run(out: Path, tensors: dict, report: dict) -> None:
    """Write each object with torch.save and the report, through a staging folder."""
    report["files"] = [*tensors, "report.json"]
    with staged_output(out) as staging:
        for name, obj in tensors.items():
            torch.save(obj, staging / name)
        write_json(staging / "report.json", report)
    print(f"written to {out}/: {', '.join(report['files'])}")


def run_prune(args) -> int:
    if args.pattern is None:
        _check_range("sparsity", args.sparsity, 0.0, 1.0)
    out = Path(args.out) if args.out else default_out("prune")
    torch.manual_seed(args.seed)
    task, model, split = _prepare(args)
    data = [(split.train_x[i:i + args.batch_size], split.train_y[i:i + args.batch_size])
            for i in range(0, len(split.train_x) - args.batch_size + 1, args.batch_size)]
    if args.calibrate_bn:  # the dense model gets the same BatchNorm treatment as the pruned one
        recalibrate_batchnorm(model, data, args.calibrate_bn)
    before = accuracy(model, split.test_x, split.test_y)
    try:
        nm = parse_pattern(args.pattern)
    except ValueError as error:
        raise CliError(str(error)) from None
    steps = (min(args.recompute, nm[0]) if nm else args.recompute) if args.method == "obs" else 1
    start = time.perf_counter()
    try:
        with _pruning_progress(args.method, steps, args.num_grads, f"prune {args.model} ({args.method})",
                               args.quiet) as hooks:
            masks = prune_oneshot(model, None if args.pattern else args.sparsity, data, nn.functional.cross_entropy,
                                  method=args.method, num_grads=args.num_grads, damp=args.damp,
                                  block_size=args.block_size or None, recompute=args.recompute,
                                  per_sample=args.per_sample, scope=args.scope, pattern=args.pattern, **hooks)
    except ValueError as error:
        raise CliError(str(error)) from None
    if args.calibrate_bn:
        recalibrate_batchnorm(model, data, args.calibrate_bn)
    report = {**_run_header("prune", args, task),
              "test_accuracy_before": before, "test_accuracy_after": accuracy(model, split.test_x, split.test_y),
              "sparsity": masks.sparsity(), "per_tensor_sparsity": masks.per_tensor_sparsity(),
              "seconds": time.perf_counter() - start}
    print(f"pruned {args.model} with {args.method} to sparsity {masks.sparsity():.4f}: test accuracy "
          f"{100 * before:.1f}% -> {100 * report['test_accuracy_after']:.1f}%")
    _save_run(out, {"pruned.pt": model.state_dict(), "masks.pt": masks.state_dict()}, report)
    return 0


def run_bench(args) -> int:
    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (folder / "fisher.py").exists():
        raise CliError("mfac bench runs the scripts in the source checkout's benchmarks/ folder, which this "
                       "installation does not have; clone the repository and pip install -e . there")
    scripts = [["fisher.py", "--quick"], ["optimizer.py", "--quick", "--part", "1"],
               ["pruning.py", "--quick", "--part", "digits"]]
    for script in scripts:
        print(f"\n$ python benchmarks/{' '.join(script)}", flush=True)
        result = subprocess.run([sys.executable, str(folder / script[0]), *script[1:]], cwd=folder.parent)
        if result.returncode != 0:
            print(f"mfac: error: benchmarks/{script[0]} failed with exit status {result.returncode}", file=sys.stderr)
            return 1
    return 0


# Entry point -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    formatter = _Formatter
    parser = _Parser(prog="mfac", description="M-FAC second-order optimization and pruning for PyTorch.",
                     formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"mfac {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(sub):
        sub.add_argument("--out", default=None, help="output folder (default: a new folder under ./mfac-runs/)")
        sub.add_argument("--seed", type=int, default=0, help="random seed (runs are deterministic per machine)")
        sub.add_argument("--quiet", action="store_true", help="no progress output")

    demo = commands.add_parser("demo", help="the main job: train with MFAC/Adam/SGD, prune with OBS/magnitude",
                               formatter_class=formatter,
                               description="Train an MLP on scikit-learn's digits with MFAC, Adam and SGD, prune the "
                                           "MFAC-trained model one-shot with OBS and magnitude (50-95% and 2:4), "
                                           "fine-tune the 90% OBS model, and write report.json, report.md and plots.")
    demo.add_argument("--quick", action="store_true", help="a shorter run (under a minute)")
    common(demo)
    demo.set_defaults(func=run_demo)

    def model_data(sub):
        sub.add_argument("--model", default="mlp", choices=MODELS, help="built-in model")
        sub.add_argument("--data", default="digits", help="digits, mnist-idx:PATH or cifar-npz:PATH")
        sub.add_argument("--checkpoint", default=None, help="start from these weights (a state dict file)")
        sub.add_argument("--batch-size", type=int, default=32, help="mini-batch size")

    train = commands.add_parser("train", help="train a built-in model", formatter_class=formatter)
    model_data(train)
    train.add_argument("--optimizer", default="mfac", choices=["mfac", "adam", "sgd"])
    train.add_argument("--lr", type=float, default=3e-3, help="learning rate")
    train.add_argument("--momentum", type=float, default=0.9, help="momentum (MFAC, SGD)")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--window", type=int, default=64, help="MFAC: gradients in the window")
    train.add_argument("--damp", type=float, default=1e-2, help="MFAC: damping lambda")
    train.add_argument("--steps", type=int, default=500, help="training steps")
    common(train)
    train.set_defaults(func=run_train)

    prune = commands.add_parser("prune", help="prune a built-in model one-shot", formatter_class=formatter)
    model_data(prune)
    prune.add_argument("--method", default="obs", choices=["obs", "magnitude"])
    prune.add_argument("--sparsity", type=float, default=0.9, help="fraction of weights to remove")
    prune.add_argument("--pattern", default=None, help="N:M semi-structured sparsity, e.g. 2:4 (overrides --sparsity)")
    prune.add_argument("--scope", default="global", choices=["global", "layer"])
    prune.add_argument("--num-grads", type=int, default=256, help="gradients per inverse")
    prune.add_argument("--per-sample", action="store_true", help="one gradient per sample instead of per batch")
    prune.add_argument("--damp", type=float, default=1e-5, help="damping lambda of the Fisher")
    prune.add_argument("--block-size", type=int, default=128, help="block size of the inverse (0: one block)")
    prune.add_argument("--recompute", type=int, default=16, help="OBS sub-steps with fresh gradients")
    prune.add_argument("--calibrate-bn", type=int, default=0,
                       help="re-estimate BatchNorm statistics on this many training batches, before and after pruning")
    common(prune)
    prune.set_defaults(func=run_prune)

    bench = commands.add_parser("bench", help="run the benchmark scripts' quick mode", formatter_class=formatter)
    bench.set_defaults(func=run_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("mfac: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    except (CliError, FileNotFoundError, ValueError, TypeError, RuntimeError, ImportError) as error:
        if os.environ.get("MFAC_DEBUG"):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"mfac: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
