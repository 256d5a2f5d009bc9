"""The data and model of a command on a built-in model: ``--data``, ``--model`` and ``--checkpoint``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data import Split, load_digits, read_cifar_npz, read_mnist_idx
from ..models import load_checkpoint, mlp, resnet20, small_cnn
from .errors import CliError, usage_errors

__all__ = ["Task", "load_task", "build_model", "load_model_weights", "prepare"]


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
