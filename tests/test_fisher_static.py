"""Dense, static and block-diagonal Fisher inverses: what is particular to each (the block routes,
tiling, float32 and half inputs, devices, byte counts, tiny damping).

Their common protocol, on every awkward gradient matrix and damping, is checked for every
implementation at once in test_fisher_conformance.py.
"""

import pytest
import torch

from conftest import ALL_DEVICES, block_dense_fisher, check_against, dense_fisher, make_grads, rel_err
from mfac.fisher import BlockFisherInverse, DenseFisherInverse, StaticFisherInverse

__all__ = ["check_against"]  # test_fisher_window.py imports it from here


def test_both_routes_are_taken_and_agree():
    """B <= m factors B x B blocks, B > m goes through m x m; a short last block may differ."""
    grads = make_grads("tall")  # m = 40, d = 9
    assert BlockFisherInverse(grads, 1e-3, 4).routes == ("primal", "primal")
    wide = torch.randn(3, 50, dtype=torch.float64)
    assert BlockFisherInverse(wide, 1e-3, 8).routes == ("dual", "primal")  # 6 blocks of 8, then 2
    check_against(BlockFisherInverse(wide, 1e-3, 8), block_dense_fisher(wide, 1e-3, 8), 1e-10)


@pytest.mark.parametrize("case", ["wide", "tall", "noncontiguous"])
def test_block_size_at_least_d_equals_static(case):
    grads = make_grads(case)
    d = grads.shape[1]
    static = StaticFisherInverse(grads, 1e-3)
    for size in (d, d + 5):
        block = BlockFisherInverse(grads, 1e-3, size)
        x = torch.randn(2, d, dtype=torch.float64)
        assert torch.equal(block.ihvp(x), static.ihvp(x))
        assert torch.equal(block.diag(), static.diag())


@pytest.mark.parametrize("cls", [DenseFisherInverse, StaticFisherInverse])
@pytest.mark.parametrize("case", ["wide", "tall", "duplicate"])
def test_float32_well_conditioned(cls, case):
    grads = make_grads(case, dtype=torch.float32)
    damp = 1e-1
    obj = cls(grads, damp)
    assert obj.dtype == torch.float32
    check_against(obj, dense_fisher(grads, damp), 1e-4)


def test_float32_block_and_half_inputs_accumulate_in_float32():
    grads = make_grads("wide", dtype=torch.float32)
    obj = BlockFisherInverse(grads.bfloat16(), 1e-1, 5)
    assert obj.dtype == torch.float32
    check_against(obj, block_dense_fisher(grads.bfloat16().double(), 1e-1, 5), 1e-4)


def test_large_static_is_tiled_and_exact(monkeypatch):
    """Factorisation tiles (bounded temporary memory) give the same result as one big tile."""
    import mfac.fisher.block_factor as block_factor
    import mfac.fisher.blocks as blocks

    grads = torch.randn(6, 300, dtype=torch.float64)
    whole = StaticFisherInverse(grads, 1e-2)
    monkeypatch.setattr(blocks, "TILE_ELEMENTS", 50)
    monkeypatch.setattr(block_factor, "TILE_ELEMENTS", 50)
    tiled = StaticFisherInverse(grads, 1e-2)
    x = torch.randn(300, dtype=torch.float64)
    assert rel_err(tiled.ihvp(x), whole.ihvp(x)) <= 1e-12
    g2 = torch.randn(40, 30, dtype=torch.float64)
    tiled_blocks = BlockFisherInverse(g2, 1e-2, 8)  # primal route, tiled over rows
    assert tiled_blocks.routes == ("primal", "primal")
    check_against(tiled_blocks, block_dense_fisher(g2, 1e-2, 8), 1e-10)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("cls", ["dense", "static", "block"])
def test_devices(device, cls):
    grads = make_grads("wide").to(device)
    obj = {"dense": lambda: DenseFisherInverse(grads, 1e-2), "static": lambda: StaticFisherInverse(grads, 1e-2),
           "block": lambda: BlockFisherInverse(grads, 1e-2, 6)}[cls]()
    assert obj.device.type == device
    reference = block_dense_fisher(grads, 1e-2, 6) if cls == "block" else dense_fisher(grads, 1e-2)
    check_against(obj, reference, 1e-9)


def test_nbytes_reports_state():
    grads = torch.randn(8, 100)
    assert StaticFisherInverse(grads, 1e-2).nbytes == 8 * 100 * 4
    assert BlockFisherInverse(grads, 1e-2, 4).nbytes == 25 * 4 * 4 * 4  # primal: 25 blocks of 4 x 4
    assert DenseFisherInverse(grads, 1e-2).nbytes == 2 * 100 * 100 * 4  # factor and explicit inverse


@pytest.mark.parametrize("cls", [DenseFisherInverse, StaticFisherInverse])
def test_damp_below_float64_resolution_does_not_raise(cls):
    grads = torch.randn(1, 50, dtype=torch.float64).repeat(8, 1)
    obj = cls(grads, 1e-17)
    assert torch.isfinite(obj.diag()).all()
    assert torch.isfinite(BlockFisherInverse(grads, 1e-17, 7).ihvp(grads[0])).all()
