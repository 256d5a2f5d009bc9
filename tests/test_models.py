"""Reference models: shapes, and the published ResNet-20 checkpoint when ../shared/data has it."""

from pathlib import Path

import pytest
import torch

from mfac.models import load_resnet20_checkpoint, mlp, resnet20, small_cnn

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_shapes_and_sizes():
    assert mlp(64, (32,))(torch.zeros(5, 64)).shape == (5, 10)
    assert small_cnn()(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    net = resnet20()
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in net.parameters()) == 272_474


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_resnet20_checkpoint(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {"module.fc.weight": torch.zeros(10, 64)}}, bad)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_resnet20_checkpoint(bad)


def test_checkpoint_round_trip(tmp_path):
    net = resnet20()
    path = tmp_path / "net.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    loaded = load_resnet20_checkpoint(path)
    for a, b in zip(net.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.skipif(not (SHARED / "resnet20_cifar10.pth.tar").exists(), reason="../shared/data not present")
def test_published_resnet20_classifies_cifar():
    from mfac.data import read_cifar_npz

    net = load_resnet20_checkpoint(SHARED / "resnet20_cifar10.pth.tar").eval()
    x, y = read_cifar_npz(SHARED / "cifar10_test_jpeg.npz")
    with torch.no_grad():
        accuracy = float((net(x[:1000]).argmax(1) == y[:1000]).float().mean())
    assert accuracy > 0.55  # 62.6% on the whole JPEG copy (see ../shared/data/README.md); chance is 10%
