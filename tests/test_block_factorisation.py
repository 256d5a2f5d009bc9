"""The factorisation behind every block-diagonal inverse: the compiled ``inverse_factors`` kernel
against LAPACK in float64, and the precision rule of ``BlockFisherInverse`` (float32 where a block's
measured residual allows, float64 otherwise, LAPACK where the kernel cannot run)."""

import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import block_dense_fisher, rel_err, solve, tolerance
from mfac import kernels
from mfac.fisher import BlockFisherInverse

needs_kernels = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) on PATH")


def spd_blocks(count: int, size: int, rank: int, damp: float, gen: torch.Generator, scales=None) -> torch.Tensor:
    """count damped Gram matrices G^T G / rank + damp I of (rank, size) gradients, float64."""
    g = torch.randn(count, rank, size, dtype=torch.float64, generator=gen)
    if scales is not None:
        g = g * scales
    out = g.mT @ g / max(rank, 1)
    out.diagonal(dim1=1, dim2=2).add_(damp)
    return out


def reference_factors(matrices: torch.Tensor) -> torch.Tensor:
    lower = torch.linalg.cholesky(matrices)
    eye = torch.eye(matrices.shape[-1], dtype=matrices.dtype).expand_as(lower)
    return torch.linalg.solve_triangular(lower, eye, upper=False)


def unit_probe(size: int, seed: int = 0) -> torch.Tensor:
    z = torch.randn(size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return z / z.norm()


def factorise(work: torch.Tensor, limit: float = float("inf")):
    """kernels.inverse_factors with a unit probe; (info, residual, probe)."""
    probe = unit_probe(work.shape[-1])
    result = kernels.inverse_factors(work, probe, limit)
    assert result is not None, kernels.status()
    return (*result, probe)


def residual(factors: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """|X A X^T - I| per block (spectral norm), in float64."""
    x = factors.double()
    eye = torch.eye(x.shape[-1], dtype=torch.float64)
    return torch.linalg.matrix_norm(x @ matrices @ x.mT - eye, ord=2)


def check_inverse_factors(gen: torch.Generator) -> None:
    """Sizes around the vector width (16 floats / 8 doubles) and the panel of 8 rows, in both
    precisions: lower triangular with exact zeros above, and backward stable."""
    for dtype in (torch.float32, torch.float64):
        eps = torch.finfo(dtype).eps
        for size in (1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 100, 128, 130, 256):
            for rank in (size // 2, 2 * size):  # rank-deficient (cond ~ 1/damp) and full rank
                matrices = spd_blocks(3, size, rank, 1e-2, gen)
                work = matrices.to(dtype, copy=True)
                info, probed, z = factorise(work)
                assert info.tolist() == [0, 0, 0]
                assert torch.equal(work.triu(1), torch.zeros_like(work))
                x = work.double()
                product = x @ (matrices.to(dtype).double() @ (x.mT @ z[:, None]))
                expected_probe = torch.linalg.vector_norm(product[..., 0] - z, dim=1)
                assert torch.allclose(probed, expected_probe, rtol=1e-6, atol=1e-12)
                cond = torch.linalg.cond(matrices)
                assert bool((residual(work, matrices) <= 10 * size * eps * cond).all()), (dtype, size, rank)
                if dtype == torch.float64:
                    expected = reference_factors(matrices)
                    assert rel_err(work, expected) <= 1e3 * eps * float(cond.max()) ** 0.5


@needs_kernels
def test_inverse_factors_match_lapack_on_awkward_sizes():
    if not kernels.available():
        pytest.fail(f"a C compiler is on PATH but the kernels are not in use: {kernels.status()}")
    check_inverse_factors(torch.Generator().manual_seed(0))


@needs_kernels
@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 70), count=st.integers(1, 5), rank=st.integers(0, 80),
       log_damp=st.floats(-6, 2), log_scale=st.floats(-8, 8), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_inverse_factors_are_backward_stable(size, count, rank, log_damp, log_scale, dtype):
    """Hypothesis: any damped Gram matrix, scaled over 32 orders of magnitude; the residual of X A X^T is
    within a small multiple of n * eps * cond(A), or the block is reported as failed (float32 with a
    condition number near 1/eps), never silently wrong."""
    gen = torch.Generator().manual_seed(size * 1000 + count * 10 + rank)
    if rank == 0:
        matrices = torch.eye(size, dtype=torch.float64).expand(count, size, size) * 10.0 ** log_damp
    else:
        matrices = spd_blocks(count, size, rank, 10.0 ** log_damp, gen)
    matrices = (matrices * 10.0 ** (2 * log_scale)).contiguous()  # the whole matrix over 32 orders
    work = matrices.to(dtype, copy=True)
    info, probed, _ = factorise(work)
    assert bool((probed[info != 0] == float("inf")).all())
    cond = torch.linalg.cond(matrices)
    eps = torch.finfo(dtype).eps
    ok = info == 0
    assert bool(ok[cond * size * eps < 0.01].all())  # a well-conditioned block never fails
    if bool(ok.any()):
        assert bool((residual(work[ok], matrices[ok]) <= 10 * size * eps * cond[ok]).all())


@needs_kernels
def test_an_indefinite_block_is_reported_and_the_others_are_still_factorised():
    gen = torch.Generator().manual_seed(1)
    matrices = spd_blocks(4, 20, 40, 0.1, gen)
    matrices[2, 5, 5] = -1.0  # the sixth pivot cannot be positive
    work = matrices.to(torch.float32, copy=True)
    info, _, _ = factorise(work)
    assert info[2] == 6 and info[[0, 1, 3]].tolist() == [0, 0, 0]
    assert torch.equal(work[2], matrices[2].float())  # left exactly as it was, for the caller to redo
    good = [0, 1, 3]
    assert rel_err(work[good], reference_factors(matrices[good])) < 1e-5


@needs_kernels
def test_blocks_over_the_residual_limit_are_left_as_they_were():
    gen = torch.Generator().manual_seed(8)
    matrices = torch.cat([spd_blocks(2, 24, 48, 1.0, gen), spd_blocks(2, 24, 3, 1e-6, gen)])  # cond ~1e1, ~1e7
    work = matrices.to(torch.float32, copy=True)
    info, probed, _ = factorise(work, limit=1e-3)
    assert info[:2].tolist() == [0, 0]
    assert bool((probed[:2] < 1e-5).all()) and bool((probed[2:] > 1e-3).all())
    assert torch.equal(work[2:], matrices[2:].float())
    assert rel_err(work[:2], reference_factors(matrices[:2])) < 1e-5


def test_inverse_factors_decline_what_they_cannot_take():
    """None, nothing changed, for what the kernel does not take: the caller uses LAPACK."""
    big = torch.eye(kernels.INVERSE_FACTORS_MAX_SIZE + 1).unsqueeze(0)
    strided = torch.eye(8, dtype=torch.float64).expand(3, 8, 8)
    for blocks in (big, strided, torch.eye(4, dtype=torch.bfloat16)[None], torch.eye(4)):
        before = blocks.clone()
        assert kernels.inverse_factors(blocks, unit_probe(blocks.shape[-1])) is None
        assert torch.equal(blocks, before)


def ill_conditioned_gradients(gen: torch.Generator) -> torch.Tensor:
    """48 gradients over 4 blocks of 32: blocks 0 and 2 rank 48 (well conditioned), blocks 1 and 3
    spanned by 2 directions, so with a tiny damp their condition number is about 1e9."""
    g = torch.randn(48, 128, generator=gen)
    low = torch.randn(48, 2, generator=gen) @ torch.randn(2, 32, generator=gen)
    g[:, 32:64], g[:, 96:128] = low, low * 3
    return g


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "lapack"])
def test_precision_follows_the_measured_conditioning(monkeypatch, kernel):
    """float32 factors: the well-conditioned blocks stay in float32, the two ill-conditioned ones
    are redone in float64 (with the kernel); without it every block is float64, as before. Either
    way ihvp is backward stable against the dense float64 reference, and both routes agree."""
    if kernel and not kernels.available():
        pytest.skip(kernels.status())
    if not kernel:
        monkeypatch.setattr(kernels, "inverse_factors", lambda *args, **kwargs: None)
    grads = ill_conditioned_gradients(torch.Generator().manual_seed(2))
    damp = 1e-7
    fisher = BlockFisherInverse(grads, damp=damp, block_size=32)
    assert fisher.float64_blocks == (2 if kernel else 4)
    dense = block_dense_fisher(grads.double(), damp, 32)
    x = torch.randn(128, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert rel_err(fisher.ihvp(x.float()), solve(dense, x)) <= tolerance(dense, torch.float32)
    well = torch.cat([torch.arange(0, 32), torch.arange(64, 96)])
    assert rel_err(fisher.diag()[well], torch.linalg.inv(dense).diagonal()[well]) < 1e-5


def test_streamed_statistics_take_the_same_rule():
    """from_chunks factorises its float32 sums in place by the same rule: the same blocks go to
    float64 and the inverse matches the one built from the whole matrix."""
    if not kernels.available():
        pytest.skip(kernels.status())
    grads = ill_conditioned_gradients(torch.Generator().manual_seed(4))
    whole = BlockFisherInverse(grads, damp=1e-7, block_size=32)
    streamed = BlockFisherInverse.from_chunks(grads.split(10), 128, 32, damp=1e-7)
    assert streamed.float64_blocks == whole.float64_blocks == 2
    x = torch.randn(128, generator=torch.Generator().manual_seed(5))
    dense = block_dense_fisher(grads.double(), 1e-7, 32)
    for fisher in (whole, streamed):
        assert rel_err(fisher.ihvp(x), solve(dense, x.double())) <= tolerance(dense, torch.float32)


def test_float64_factors_never_take_float32():
    grads = torch.randn(200, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    fisher = BlockFisherInverse(grads, damp=0.1, block_size=64)
    assert fisher.float64_blocks == 4
    dense = block_dense_fisher(grads, 0.1, 64)
    x = torch.randn(256, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    assert rel_err(fisher.ihvp(x), solve(dense, x)) <= tolerance(dense, torch.float64)


def check_gram_update(gen: torch.Generator) -> None:
    """The lower triangle of every block gets P_b^T P_b, for row counts around the register tile
    and the row group, both dtypes, a column offset and a row stride wider than the row."""
    for dtype in (torch.float32, torch.float64):
        for n, size, count in ((1, 32, 3), (7, 64, 2), (33, 128, 5), (300, 32, 2)):
            wide = torch.randn(n, 5 + count * size + 11, dtype=dtype, generator=gen)
            rows = wide[:, 2:]  # stride(0) wider than the row
            start = 3
            before = torch.randn(count, size, size, dtype=dtype, generator=gen)
            stats = before.clone()
            assert kernels.gram_update(stats, rows, start)
            p = rows[:, start: start + count * size].double().reshape(n, count, size).transpose(0, 1)
            expected = before.double() + p.mT @ p
            lower = torch.ones(size, size, dtype=torch.bool).tril()
            eps = torch.finfo(dtype).eps
            scale = expected.abs().amax()
            assert float((stats.double() - expected)[:, lower].abs().max()) <= 4 * n * eps * float(scale)
            touched = (stats != before) & ~lower  # above the diagonal: either untouched or true values
            if bool(touched.any()):
                assert float((stats.double() - expected)[touched].abs().max()) <= 4 * n * eps * float(scale)


@needs_kernels
def test_gram_update_matches_the_batched_product():
    if not kernels.available():
        pytest.fail(f"a C compiler is on PATH but the kernels are not in use: {kernels.status()}")
    check_gram_update(torch.Generator().manual_seed(9))


def test_gram_update_declines_what_it_cannot_take():
    stats = torch.zeros(2, 48, 48)  # 48 is not a multiple of 32 floats
    assert not kernels.gram_update(stats, torch.ones(4, 96), 0)
    assert not kernels.gram_update(torch.zeros(2, 32, 32), torch.ones(4, 64, dtype=torch.float64), 0)
    assert not kernels.gram_update(torch.zeros(2, 32, 32), torch.ones(64, 4).T, 0)  # columns not contiguous
    assert not kernels.gram_update(torch.zeros(2, 32, 32), torch.ones(4, 60), 0)  # too few columns
    assert torch.equal(stats, torch.zeros(2, 48, 48))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streamed_statistics_match_with_and_without_the_kernel(monkeypatch, dtype):
    """from_chunks with the Gram kernel (lower triangles) and with batched products (whole blocks),
    a pruning mask and a short last block (the torch path) give the same inverse."""
    gen = torch.Generator().manual_seed(10)
    grads = torch.randn(70, 3 * 64 + 20, dtype=dtype, generator=gen)
    mask = torch.rand(grads.shape[1], generator=gen) > 0.3
    build = lambda: BlockFisherInverse.from_chunks(grads.split(16), grads.shape[1], 64, relative_damp=0.3,
                                                   dtype=dtype, mask=mask)
    with_kernel = build()
    monkeypatch.setattr(kernels, "gram_update", lambda *args, **kwargs: None)  # cannot run: batched products
    without = build()
    x = torch.randn(grads.shape[1], dtype=dtype, generator=gen)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel_err(with_kernel.ihvp(x), without.ihvp(x)) <= tol
    assert rel_err(with_kernel.diag(), without.diag()) <= tol


@needs_kernels
@pytest.mark.parametrize("where", [0, 40, 100], ids=["first-block", "second-block", "short-last-block"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_entry_is_refused_wherever_it_is(where, bad):
    """The kernel checks the rows as it reads them (no separate pass): NaN or Inf in a block it
    takes, or in the short last block the batched product takes, is refused with the usual error."""
    from mfac.fisher import NonFiniteGradientError

    grads = torch.randn(10, 110, generator=torch.Generator().manual_seed(11))
    grads[7, where] = bad
    stats = torch.zeros(3, 32, 32)
    if where < 96:
        assert kernels.gram_update(stats, grads, 0) is False
    with pytest.raises(NonFiniteGradientError, match="gradient chunk"):
        BlockFisherInverse.from_chunks(grads.split(4), 110, 32, relative_damp=0.3)
    assert kernels.gram_update(torch.zeros(3, 32, 32), torch.randn(4, 110), 0) is True


def test_float64_chunks_that_overflow_float32_statistics_are_refused():
    from mfac.fisher import NonFiniteGradientError

    grads = torch.randn(4, 64, dtype=torch.float64)
    grads[1, 3] = 1e300  # finite in float64, Inf once rounded to the float32 statistics
    with pytest.raises(NonFiniteGradientError, match="gradient chunk"):
        BlockFisherInverse.from_chunks([grads], 64, 32, relative_damp=0.3)


# Streamed statistics and factors are stored as packed lower triangles ----------------------------


def test_row_layouts_store_what_they_say():
    """The packed lower triangle keeps each row's first i + 1 entries rounded up to 32 (62.5% of a
    block of 128); unpack(pack(x)) keeps exactly those entries; columns() gathers what unpack holds."""
    from mfac.fisher.block_factor import RowLayout

    assert RowLayout.lower(128).length == 10_240 and RowLayout.lower(32).is_dense
    assert RowLayout.lower(100).length == 32 * 32 + 32 * 64 + 32 * 96 + 4 * 100
    gen = torch.Generator().manual_seed(12)
    for layout in (RowLayout.lower(70), RowLayout.lower(5), RowLayout.dense(3, 40)):
        blocks = torch.randn(4, layout.rows, layout.size, generator=gen)
        stored = layout.pack(blocks)
        assert stored.shape == (4, layout.length)
        unpacked = layout.unpack(stored)
        lengths = layout.starts.diff()
        kept = torch.arange(layout.size)[None, :] < lengths[:, None]
        assert torch.equal(unpacked, blocks * kept)
        assert bool((lengths >= torch.clamp(torch.arange(layout.rows) + 1, max=layout.size)).all())  # the triangle
        block = torch.tensor([3, 0, 3])
        columns = torch.randint(0, layout.size, (3, 6), generator=gen)
        expected = unpacked[block[:, None, None], torch.arange(layout.rows)[None, :, None], columns[:, None, :]]
        assert torch.equal(layout.columns(stored, block, columns), expected)
        diagonal = layout.diagonal()
        assert torch.equal(stored[:, diagonal], blocks.diagonal(dim1=1, dim2=2)[:, :len(diagonal)])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_on_packed_blocks_match_full_blocks(dtype):
    """gram_update and inverse_factors on packed lower triangles write the same lower triangles as on
    full (B, B) blocks (B = 64, and 96 where a row's padding ends inside the block), stored entries
    above the diagonal of the factors are zero; rows shorter than the kernels need are declined."""
    if not kernels.available():
        pytest.fail(f"a C compiler is on PATH but the kernels are not in use: {kernels.status()}")
    from mfac.fisher.block_factor import RowLayout

    gen = torch.Generator().manual_seed(13)
    for size in (64, 96):
        layout = RowLayout.lower(size)
        rows = torch.randn(37, 3 * size + 5, dtype=dtype, generator=gen)
        full = torch.zeros(3, size, size, dtype=dtype)
        packed = torch.zeros(3, layout.length, dtype=dtype)
        assert kernels.gram_update(full, rows, 5) and kernels.gram_update(packed, rows, 5, starts=layout.starts)
        lower = torch.ones(size, size, dtype=torch.bool).tril()
        assert torch.equal(layout.unpack(packed)[:, lower], full[:, lower])
        packed /= 37
        packed[:, layout.diagonal()] += 0.1
        matrices = layout.unpack(packed).tril()
        info, probed, _ = factorise(matrices)
        result = kernels.inverse_factors(packed, unit_probe(size), starts=layout.starts)
        assert result is not None and result[0].tolist() == info.tolist() == [0, 0, 0]
        assert torch.equal(result[1], probed) and torch.equal(layout.unpack(packed), matrices)
    short = RowLayout.dense(64, 64).starts.clone()
    short[1:] = torch.arange(1, 65) * 8  # rows of 8: fewer than the kernels read
    stats = torch.zeros(2, 512, dtype=dtype)
    assert kernels.gram_update(stats, torch.ones(4, 128, dtype=dtype), 0, starts=short) is None
    assert kernels.inverse_factors(stats, unit_probe(64), starts=short) is None
    assert not bool(stats.any())


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block_size", [48, 64, 100])
def test_packed_streamed_inverse_conforms(monkeypatch, kernel, dtype, block_size):
    """Every protocol query of a streamed inverse over blocks wider than one packed row tile,
    against the dense float64 reference (the conformance harness), with a mask and a short last
    block, with the compiled kernels and with torch alone; nbytes counts the packed triangles."""
    from test_fisher_conformance import build_chunks, check_conformance

    if kernel and not kernels.available():
        pytest.skip(kernels.status())
    if not kernel:
        monkeypatch.setattr(kernels, "gram_update", lambda *args, **kwargs: None)
        monkeypatch.setattr(kernels, "inverse_factors", lambda *args, **kwargs: None)
    grads = torch.randn(30, 2 * block_size + 21, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    subject = build_chunks(grads, 1e-2, torch.device("cpu"), block_size, dtype=dtype, masked=True)
    check_conformance(subject)
    assert subject.obj.nbytes < grads.shape[1] * block_size * dtype.itemsize
