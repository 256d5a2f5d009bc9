"""Data loaders: bundled sets, and readers for the files in ../shared/data when present."""

from pathlib import Path

import pytest
import torch

from mfac.data import batches, load_breast_cancer, load_digits, read_cifar_npz, read_mnist_idx

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_digits_split_is_deterministic_and_disjoint():
    a, b = load_digits(seed=3), load_digits(seed=3)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert len(a.train_x) + len(a.test_x) == 1797 and a.num_classes == 10
    assert a.train_x.dtype == torch.float32 and 0 <= float(a.train_x.min()) and float(a.train_x.max()) <= 1
    assert load_digits(images=True).train_x.shape[1:] == (1, 8, 8)


def test_breast_cancer_is_standardised_on_train():
    split = load_breast_cancer()
    assert split.train_x.shape[1] == 30 and split.num_classes == 2
    assert torch.allclose(split.train_x.mean(0), torch.zeros(30), atol=1e-5)


def test_batches_cycle_through_epochs():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    stream = batches(x, y, 4, torch.Generator().manual_seed(0))
    seen = [next(stream)[1] for _ in range(4)]  # 2 batches per epoch, the rest dropped
    assert all(len(s) == 4 for s in seen)
    assert len(set(torch.cat(seen[:2]).tolist())) == 8


@pytest.mark.parametrize("size", [0, -1, 11, 2.5, True])
def test_batches_refuse_impossible_sizes_instead_of_hanging(size):
    with pytest.raises(ValueError, match=r"batch_size must be an int in \[1, 10\]"):
        batches(torch.zeros(10, 2), torch.zeros(10), size)


def test_bad_split_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.5)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such MNIST file"):
        read_mnist_idx(tmp_path / "a", tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="no such CIFAR file"):
        read_cifar_npz(tmp_path / "c.npz")


@pytest.mark.skipif(not (SHARED / "t10k-images-idx3-ubyte.gz").exists(), reason="../shared/data not present")
def test_reads_real_mnist():
    images, labels = read_mnist_idx(SHARED / "t10k-images-idx3-ubyte.gz", SHARED / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 1, 28, 28) and labels.shape == (10000,)
    assert set(labels.unique().tolist()) == set(range(10))


@pytest.mark.skipif(not (SHARED / "cifar10_test_jpeg.npz").exists(), reason="../shared/data not present")
def test_reads_real_cifar():
    images, labels = read_cifar_npz(SHARED / "cifar10_test_jpeg.npz")
    assert images.shape == (10000, 3, 32, 32) and torch.bincount(labels).tolist() == [1000] * 10
    assert abs(float(images.mean())) < 0.5
