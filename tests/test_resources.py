"""Memory checks (mfac.resources): sizes that cannot fit are refused before anything is allocated,
with what they need and the setting to lower; an unknown amount of memory refuses nothing."""

import pytest
import torch

from mfac import MFAC, SlidingWindowFisherInverse
from mfac.fisher import BlockFisherInverse
from mfac.models import mlp
from mfac.resources import InsufficientMemoryError


def test_impossible_window_is_refused_before_allocating():
    with pytest.raises(InsufficientMemoryError, match=r"needs .* TB but only .* available.*lower window"):
        SlidingWindowFisherInverse(10**9, 10**5, 1e-2)
    with pytest.raises(MemoryError, match="lower window"):
        MFAC([torch.nn.Parameter(torch.zeros(10**6))], window=10**7)


def test_block_inverse_and_gradient_matrix_are_checked_against_available_memory(monkeypatch):
    from mfac import resources
    from mfac.grads import collect_gradients

    grads = torch.randn(64, 4000)  # block factors of 4000 x 64 numbers plus float64 work: over 1 MB
    monkeypatch.setattr(resources, "available_bytes", lambda device: 1_000_000)
    with pytest.raises(InsufficientMemoryError, match="block_size"):
        BlockFisherInverse(grads, 1e-2, 128)
    model = mlp(64, (64,))
    data = iter([(torch.randn(4, 64), torch.zeros(4, dtype=torch.long))] * 100)
    with pytest.raises(InsufficientMemoryError, match="num_grads"):
        collect_gradients(model, dict(model.named_parameters()), data, torch.nn.functional.cross_entropy,
                          num_grads=100)
    monkeypatch.setattr(resources, "available_bytes", lambda device: None)  # unknown: no refusal
    assert BlockFisherInverse(grads, 1e-2, 128).dim == 4000
