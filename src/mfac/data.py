"""Data sets for examples, tests and benchmarks, as tensors.

* Bundled with scikit-learn (no download; ``pip install "mfac-torch[examples]"``): ``digits`` (8x8 images,
  10 classes, 1,797 samples) and ``breast_cancer`` (30 features, 2 classes, 569 samples).
* Readers for files a user already has: MNIST IDX files and a CIFAR-10 ``.npz`` (``x`` uint8
  (n, 32, 32, 3), ``y`` uint8 (n,)).

Every loader returns float32 inputs and int64 labels on the CPU.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Split", "load_digits", "load_breast_cancer", "read_mnist_idx", "read_cifar_npz", "batches", "ShuffledBatches"]


@dataclass
class Split:
    """A train/test split: inputs (n, ...) float32 and targets (n,) int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def flattened(self) -> "Split":
        """The same split with every input flattened to a vector, (n, ...) -> (n, features)."""
        return Split(self.train_x.flatten(1), self.train_y, self.test_x.flatten(1), self.test_y)

    @property
    def num_classes(self) -> int:
        return int(torch.cat([self.train_y, self.test_y]).max()) + 1


def _sklearn_dataset(name: str):
    try:
        import sklearn.datasets
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(f"the {name} data set ships with scikit-learn: pip install 'mfac-torch[examples]'") from error
    return getattr(sklearn.datasets, f"load_{name}")()


def _split(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int) -> Split:
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train], x[test], y[test])


def load_digits(test_fraction: float = 0.25, seed: int = 0, images: bool = False) -> Split:
    """scikit-learn's digits, pixels scaled to [0, 1]: inputs (n, 64), or (n, 1, 8, 8) with ``images``."""
    data = _sklearn_dataset("digits")
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    if images:
        x = x.reshape(-1, 1, 8, 8)
    return _split(x, torch.tensor(data.target, dtype=torch.int64), test_fraction, seed)


def load_breast_cancer(test_fraction: float = 0.25, seed: int = 0) -> Split:
    """scikit-learn's breast-cancer data, standardised with the training split's mean and std."""
    data = _sklearn_dataset("breast_cancer")
    split = _split(torch.tensor(data.data, dtype=torch.float32), torch.tensor(data.target, dtype=torch.int64),
                   test_fraction, seed)
    mean, std = split.train_x.mean(0), split.train_x.std(0).clamp_min(1e-8)
    split.train_x, split.test_x = (split.train_x - mean) / std, (split.test_x - mean) / std
    return split


def _read_idx(path: str | Path, magic: int, what: str) -> torch.Tensor:
    """The uint8 payload of an IDX file (gzip or not), checked against its header: the magic
    number, and the dimensions that say how many bytes must follow."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such MNIST file: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise ValueError(f"{path} is not an MNIST IDX {what} file: its gzip data is damaged ({error})") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise ValueError(f"{path} is not an MNIST IDX {what} file (it should start with the magic number "
                         f"0x{magic:08x})")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise ValueError(f"{path} is not a complete MNIST IDX {what} file: its header announces {dims} "
                         f"({expected} bytes) but it has {len(raw)} bytes")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(dims)


def read_mnist_idx(images_path: str | Path, labels_path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST from IDX files (gzip or not): images (n, 1, 28, 28) in [0, 1], labels (n,). Raises
    ValueError naming the file when it is not an IDX file of the right kind or is incomplete."""
    images = _read_idx(images_path, 0x00000803, "images")
    labels = _read_idx(labels_path, 0x00000801, "labels").long()
    images = images.reshape(-1, 1, *images.shape[1:]).float() / 255.0
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    return images, labels


def read_cifar_npz(path: str | Path, mean=(0.491, 0.482, 0.447), std=(0.247, 0.243, 0.262)):
    """CIFAR-10 from an .npz with ``x`` (n, 32, 32, 3) uint8 and ``y`` (n,): images (n, 3, 32, 32)
    normalised per channel with ``mean``/``std`` (the published ResNet-20's), labels (n,). The file
    is read without unpickling; a file of another kind raises ValueError naming what is wrong."""
    import zipfile

    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such CIFAR file: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{path} is not a CIFAR .npz file ({' '.join(str(error).split())[:80]})") from None
    try:
        with archive as data:
            if not hasattr(data, "files"):
                raise ValueError(f"{path} is not a CIFAR .npz file (it holds a single array, not x and y)")
            for key in ("x", "y"):
                if key not in data.files:
                    raise ValueError(f"{path} has no array {key!r} (it has {sorted(data.files)}); a CIFAR .npz needs "
                                     f"x (n, 32, 32, 3) uint8 and y (n,)")
            x, y = data["x"], data["y"]
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{path} is not a CIFAR .npz file ({' '.join(str(error).split())[:100]})") from None
    if x.ndim != 4 or x.shape[1:] != (32, 32, 3) or x.dtype != np.uint8 or y.shape != (len(x),):
        raise ValueError(f"{path}: x must be (n, 32, 32, 3) uint8 and y (n,), got x {x.shape} {x.dtype} and "
                         f"y {y.shape}")
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
    y = torch.from_numpy(y.astype(np.int64))
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x, y


class ShuffledBatches:
    """An endless iterator of shuffled (inputs, targets) mini-batches, one epoch after another,
    that can save and restore its position (``state_dict``), so a resumed training run sees exactly
    the batches an uninterrupted one would.

    Each epoch draws a permutation from ``generator`` and yields ``len(x) // batch_size`` batches
    (the remainder of an epoch is dropped). Memory: one permutation of len(x) indices.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator | None = None):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}; they must match")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= len(x):
            raise ValueError(f"batch_size must be an int in [1, {len(x)}] (the number of samples), got {batch_size!r}")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generator = generator if generator is not None else torch.Generator().manual_seed(
            int(torch.randint(0, 2**62, (1,))))
        self._epoch_start_state = self.generator.get_state()
        self._order = torch.randperm(len(x), generator=self.generator)
        self._position = 0
        self._epoch = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self._position + self.batch_size > len(self.x):
            self._epoch_start_state = self.generator.get_state()
            self._order = torch.randperm(len(self.x), generator=self.generator)
            self._position = 0
            self._epoch += 1
        index = self._order[self._position: self._position + self.batch_size]
        self._position += self.batch_size
        return self.x[index], self.y[index]

    def state_dict(self) -> dict:
        """Where the stream is: the generator's state at the start of this epoch, the epoch and the
        position in it (plain tensors and ints, loadable with ``weights_only=True``)."""
        return {"epoch": self._epoch, "position": self._position, "batch_size": self.batch_size,
                "num_samples": len(self.x), "generator_state": self._epoch_start_state.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a ``state_dict``; checks that it describes the same data and batch size."""
        for key in ("epoch", "position", "batch_size", "num_samples", "generator_state"):
            if key not in state:
                raise ValueError(f"batch stream state is missing {key!r}; pass the output of state_dict()")
        if state["num_samples"] != len(self.x) or state["batch_size"] != self.batch_size:
            raise ValueError(f"batch stream state is for {state['num_samples']} samples in batches of "
                             f"{state['batch_size']}, but this stream has {len(self.x)} in batches of {self.batch_size}")
        position = state["position"]
        if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position <= len(self.x):
            raise ValueError(f"batch stream state has position {position!r}, outside [0, {len(self.x)}]")
        generator_state = state["generator_state"]
        if not isinstance(generator_state, torch.Tensor) or generator_state.dtype != torch.uint8:
            raise ValueError("batch stream state has no valid generator_state (a uint8 tensor)")
        probe = torch.Generator()
        try:
            probe.set_state(generator_state)
        except RuntimeError as error:
            raise ValueError(f"batch stream state has an invalid generator_state: {error}") from None
        order = torch.randperm(len(self.x), generator=probe)
        self.generator.set_state(probe.get_state())
        self._epoch_start_state, self._order = generator_state.clone(), order
        self._position, self._epoch = position, int(state["epoch"])


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int,
            generator: torch.Generator | None = None) -> ShuffledBatches:
    """Shuffled (inputs, targets) mini-batches forever (one epoch after another); see
    :class:`ShuffledBatches`. ``batch_size`` must be between 1 and the number of samples."""
    return ShuffledBatches(x, y, batch_size, generator)
