"""Reference models for examples, tests and benchmarks.

* :func:`mlp` and :func:`small_cnn`: small networks for scikit-learn's 8x8 digits.
* :func:`resnet20`: the CIFAR-10 ResNet-20 (0.27 M weights) in the layout of the checkpoint
  published with the M-FAC paper's code; :func:`load_resnet20_checkpoint` reads that file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_weights

__all__ = ["mlp", "small_cnn", "resnet20", "load_checkpoint", "load_resnet20_checkpoint"]


def mlp(in_features: int = 64, hidden: tuple[int, ...] = (32,), num_classes: int = 10) -> nn.Sequential:
    """A ReLU multi-layer perceptron: Linear layers of the given hidden widths, then a classifier."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def small_cnn(num_classes: int = 10, channels: int = 16, in_channels: int = 1) -> nn.Sequential:
    """A two-convolution network for (n, in_channels, H, W) images; designed for 8x8 digits (38k
    weights), it pools any larger image down to 4x4 before the classifier."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(4),
        nn.Flatten(), nn.Linear(2 * channels * 16, 64), nn.ReLU(), nn.Linear(64, num_classes),
    )


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet20(nn.Module):
    """ResNet-20 for 32x32 images: a 16-channel stem, three stages of three basic blocks
    (16, 32, 64 channels), global average pooling and a linear head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes, stages = 16, []
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [_BasicBlock(planes, width, stride)] + [_BasicBlock(width, width, 1) for _ in range(2)]
            stages.append(nn.Sequential(*blocks))
            planes = width
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(out.mean(dim=(2, 3)))


def resnet20(num_classes: int = 10) -> ResNet20:
    return ResNet20(num_classes)


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights from a safetensors file or a torch file holding a state dict (or a dict with one
    under ``state_dict`` or ``model``; keys may carry DataParallel's ``module.`` prefix). Files are
    read without running code (see :mod:`mfac.checkpoint`). Raises FileNotFoundError,
    :class:`~mfac.checkpoint.UnsafeFileError` or :class:`~mfac.checkpoint.CorruptFileError` for a
    file that is not a plain state dict, or RuntimeError naming missing/unexpected keys or
    mismatched shapes."""
    raw = load_weights(path)
    model.load_state_dict({key.removeprefix("module."): value for key, value in raw.items()}, strict=True)
    return model


def load_resnet20_checkpoint(path: str | Path, model: ResNet20 | None = None) -> ResNet20:
    """Load the published CIFAR-10 ResNet-20 checkpoint (a dict with ``state_dict`` whose keys carry
    a ``module.`` prefix) into ``model`` (default: a new ResNet-20)."""
    return load_checkpoint(model if model is not None else resnet20(), path)
