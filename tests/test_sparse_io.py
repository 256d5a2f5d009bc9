"""Sparse weight files: kept values plus a bitmask, smaller on disk, the same tensors back."""

import os

import pytest
import torch

from mfac import checkpoint
from mfac.checkpoint import CorruptFileError
from mfac.models import mlp
from mfac.prune import prune_oneshot
from mfac.sparse_io import load_sparse, save_sparse

pytest.importorskip("safetensors")


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
def test_round_trip_and_size(tmp_path, sparsity):
    torch.manual_seed(0)
    model = mlp(64, (257,), 10).to(torch.float64)  # 257: masks whose length is not a multiple of 8
    masks = prune_oneshot(model, sparsity, method="magnitude")
    size = save_sparse(model.state_dict(), masks, tmp_path / "sparse.safetensors")
    checkpoint.save_weights(model.state_dict(), tmp_path / "dense.safetensors")
    dense = os.path.getsize(tmp_path / "dense.safetensors")
    weights, loaded_masks = load_sparse(tmp_path / "sparse.safetensors")
    assert set(weights) == set(model.state_dict())
    assert all(torch.equal(weights[name], value) and weights[name].dtype == value.dtype
               for name, value in model.state_dict().items())
    assert set(loaded_masks) == set(masks) and all(torch.equal(loaded_masks[n], masks[n]) for n in masks)
    assert size == os.path.getsize(tmp_path / "sparse.safetensors")
    if sparsity >= 0.5:
        assert size < dense * (1 - sparsity + 0.05)
    assert size < dense * 1.05


def test_refuses_weights_that_are_not_zero_where_pruned(tmp_path):
    model = mlp(8, (6,), 3)
    masks = prune_oneshot(model, 0.5, method="magnitude")
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(ValueError, match="not zero where its mask prunes"):
        save_sparse(model.state_dict(), masks, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_inconsistent_files_are_refused(tmp_path):
    import safetensors.torch

    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file({"w.__values__": torch.ones(3), "w.__bitmask__": torch.tensor([1], dtype=torch.uint8)},
                                str(path), metadata={"mfac.sparse": '{"w": [2, 4]}'})
    with pytest.raises(CorruptFileError, match="3 values for 1 kept"):
        load_sparse(path)
    path.write_bytes(b"not a file at all")
    with pytest.raises(CorruptFileError):
        load_sparse(path)
