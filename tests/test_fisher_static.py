"""Dense, static and block-diagonal Fisher inverses against dense float64 references."""

import pytest
import torch

from conftest import ALL_DEVICES, block_dense_fisher, dense_fisher, rel_err, solve, tolerance
from mfac.fisher import BlockFisherInverse, DenseFisherInverse, StaticFisherInverse


def make_grads(case: str, dtype=torch.float64, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"wide": (7, 23), "tall": (40, 9), "single": (1, 17), "d1": (5, 1), "square": (12, 12)}
    if case in shapes:
        m, d = shapes[case]
        return torch.randn(m, d, generator=gen, dtype=torch.float64).to(dtype)
    if case == "duplicate":
        g = torch.randn(3, 19, generator=gen, dtype=torch.float64)
        return torch.cat([g, g, g[:1]]).to(dtype)
    if case == "rank_deficient":
        return (torch.randn(20, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, 15, generator=gen,
                                                                                     dtype=torch.float64)).to(dtype)
    if case == "zeros":
        return torch.zeros(6, 10, dtype=dtype)
    if case == "empty":
        return torch.zeros(0, 8, dtype=dtype)
    if case == "noncontiguous":
        return torch.randn(21, 9, generator=gen, dtype=torch.float64).to(dtype).T  # (9, 21), strided
    raise KeyError(case)


CASES = ["wide", "tall", "single", "d1", "square", "duplicate", "rank_deficient", "zeros", "empty", "noncontiguous"]
DAMPS = [1e-8, 1e-2, 1e3]


def check_against(obj, fisher: torch.Tensor, tol: float, seed=1):
    """ihvp (single, batched, non-contiguous), diag, element and column all match F^-1 for the
    dense float64 ``fisher``, within relative error ``tol``."""
    d = fisher.shape[0]
    reference = solve(fisher, torch.eye(d, dtype=torch.float64))
    gen = torch.Generator().manual_seed(seed)
    dev = obj.device
    xs = torch.randn(4, d, generator=gen, dtype=torch.float64)
    expected = solve(fisher, xs.T).T
    assert rel_err(obj.ihvp(xs.to(dev, obj.dtype)), expected) <= tol
    assert rel_err(obj.ihvp(xs[0].to(dev, obj.dtype)), expected[0]) <= tol
    strided = torch.randn(d, 3, generator=gen, dtype=torch.float64)[:, 1]  # non-contiguous vector
    assert rel_err(obj.ihvp(strided.to(dev, obj.dtype)), solve(fisher, strided)) <= tol
    assert rel_err(obj.diag(), reference.diagonal()) <= tol
    i = torch.randint(0, d, (25,), generator=gen)
    j = torch.cat([i[:5], torch.randint(0, d, (20,), generator=gen)])  # some diagonal pairs
    got = obj.element(i.to(dev), j.to(dev))
    assert got.shape == (25,)
    assert float((got.double().cpu() - reference[i, j]).abs().max()) <= tol * float(reference.abs().max())
    scalar = obj.element(d - 1, 0)
    assert scalar.dim() == 0
    assert abs(float(scalar) - float(reference[d - 1, 0])) <= tol * float(reference.abs().max())
    for col in {0, d // 2, d - 1}:
        assert rel_err(obj.column(col), reference[:, col]) <= tol


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("damp", DAMPS)
@pytest.mark.parametrize("cls", [DenseFisherInverse, StaticFisherInverse])
def test_exact_inverses_match_dense_float64(cls, case, damp):
    grads = make_grads(case)
    obj = cls(grads, damp)
    assert (obj.dim, obj.num_grads, obj.damp, obj.dtype) == (grads.shape[1], grads.shape[0], damp, torch.float64)
    fisher = dense_fisher(grads, damp)
    check_against(obj, fisher, tolerance(fisher, torch.float64))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block_size", [1, 4, 7, 100])
@pytest.mark.parametrize("damp", [1e-6, 1e-1])
def test_block_matches_block_diagonal_reference(case, block_size, damp):
    grads = make_grads(case)
    obj = BlockFisherInverse(grads, damp, block_size)
    fisher = block_dense_fisher(grads, damp, block_size)
    check_against(obj, fisher, tolerance(fisher, torch.float64))


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
    import mfac.fisher.blocks as blocks

    grads = torch.randn(6, 300, dtype=torch.float64)
    whole = StaticFisherInverse(grads, 1e-2)
    monkeypatch.setattr(blocks, "_TILE_ELEMENTS", 50)
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
