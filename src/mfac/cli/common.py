"""What the commands share: the two kinds of error, data and model set-up, the output folder, and
reports that are always valid JSON."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..checkpoint import CorruptFileError, UnsafeFileError
from ..data import Split, load_digits, read_cifar_npz, read_mnist_idx
from ..models import load_checkpoint, mlp, resnet20, small_cnn
from ..optim import MFAC
from ..progress import Progress


class CliError(Exception):
    """Bad usage, found before any work: one line on stderr, exit status 2."""


class RunError(Exception):
    """A failure while running that the command explains itself: one line, exit status 1."""


@contextmanager
def usage_errors(context: str = ""):
    """Turn the errors that bad input raises while a command is being set up into CliError."""
    try:
        yield
    except CliError:
        raise
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError, TypeError,
            KeyError, ImportError, UnsafeFileError, CorruptFileError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        if isinstance(error, KeyError):
            message = f"missing entry {message}"
        raise CliError(f"{context}{message}") from None


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
    with usage_errors(f"--data {spec}: "):
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
    raise CliError(f"unknown --model {name!r}")


def load_model_weights(model: nn.Module, path: str, model_name: str) -> None:
    """Load --checkpoint into ``model``; every problem with the file is a usage error."""
    with usage_errors(f"--checkpoint {path}: "):
        try:
            load_checkpoint(model, path)
        except RuntimeError as error:
            lines = str(error).strip().splitlines()
            raise CliError(f"checkpoint {path} does not fit --model {model_name}: "
                           f"{' '.join(line.strip() for line in lines[:3])[:300]}") from None


def prepare(args, load_weights: bool = True) -> tuple[Task, nn.Module, Split]:
    """Data, model (with --checkpoint loaded when ``load_weights``) and the split in the model's input layout."""
    task = load_task(args.data, args.seed)
    if not 1 <= args.batch_size <= len(task.split.train_x):
        raise CliError(f"--batch-size must be in [1, {len(task.split.train_x)}] (the training samples of "
                       f"{task.description}), got {args.batch_size}")
    torch.manual_seed(args.seed)
    model = build_model(args.model, task)
    if load_weights and args.checkpoint:
        load_model_weights(model, args.checkpoint, args.model)
    split = task.split.flattened() if args.model == "mlp" else task.split
    return task, model, split


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


def check_out(out: str | None, command: str, force: bool, may_exist: bool = False) -> Path:
    """The output folder, checked before any work: not a file, not inside a file, writable, and
    empty unless ``force`` (or ``may_exist``, for a run being resumed). Nothing is created."""
    path = Path(out) if out else default_out(command)
    if path.exists() and not path.is_dir():
        raise CliError(f"--out {path} is a file, not a folder; choose another --out")
    if path.is_dir() and any(path.iterdir()) and not (force or may_exist):
        raise CliError(f"--out {path} already exists and is not empty; choose a new folder, or pass --force to "
                       f"write into it")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise CliError(f"--out {path} cannot be created: {existing} is a file")
    try:  # the only reliable test of writability (permissions, read-only mounts, root or not)
        probe = tempfile.mkdtemp(prefix=".mfac-write-test-", dir=existing)
        os.rmdir(probe)
    except OSError as error:
        raise CliError(f"--out {path} cannot be written ({error.strerror or error}); choose another --out") from None
    return path


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


def json_safe(value):
    """The same structure with NaN and infinities as None, so the JSON is valid for any reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def run_header(command: str, args, description: str) -> dict:
    return {"command": command, "environment": environment(args.seed), "data": description, "model": args.model,
            "settings": {k: v for k, v in vars(args).items() if k not in ("func", "quiet", "force")}}


def pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def pruning_progress(method: str, sub_steps: int, num_grads: int, desc: str, quiet: bool):
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
