"""The compressed window (EFCP) and the compiled window kernels.

The reference for a compressed window is the dense float64 inverse over the rows it actually holds
(decoded from its values and offsets): F^-1 must match it to the same backward-stability bound as
every other Fisher object. Separately: the per-block top-k keeps the right entries, the error
feedback loses nothing (residual + kept = residual before + g), density 1 is the dense window,
refused input changes nothing, and the state round-trips bitwise through weights_only loads.
"""

import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import ALL_DEVICES, dense_fisher, rel_err, solve, tolerance
from mfac import kernels
from mfac.fisher import CompressedWindowFisherInverse, NonFiniteGradientError, SlidingWindowFisherInverse
from mfac.fisher.compressed import compressed_nbytes
from mfac.resources import InsufficientMemoryError


def held_rows(window: CompressedWindowFisherInverse) -> torch.Tensor:
    """The rows the window holds, oldest slot order irrelevant to F: (num_grads, d) float64."""
    return window.rows()


def check_against_dense(window, damp, x):
    fisher = dense_fisher(held_rows(window), damp)
    bound = tolerance(fisher, torch.float32)
    assert rel_err(window.ihvp(x), solve(fisher, x)) <= bound
    inverse = torch.linalg.inv(fisher)
    assert rel_err(window.diag(), inverse.diagonal()) <= bound
    i, j = torch.tensor([0, 5, window.dim - 1]), torch.tensor([0, window.dim - 1, 3])
    assert rel_err(window.element(i, j), inverse[i, j]) <= bound + 1e-6
    return fisher


@pytest.mark.parametrize("dim,capacity,density,block,dtype", [
    (700, 6, 0.05, 256, torch.float32),     # blocks of unequal size (700 = 2 * 256 + 188)
    (700, 1, 0.01, 256, torch.float32),     # m = 1, a single entry per block
    (300, 16, 0.2, 64, torch.bfloat16),     # bfloat16 values
    (1000, 4, 1.0, 1000, torch.float32),    # density 1: nothing left out
])
def test_ihvp_diag_element_match_dense_inverse_of_held_rows(dim, capacity, density, block, dtype):
    gen = torch.Generator().manual_seed(0)
    damp = 1e-3
    window = CompressedWindowFisherInverse(dim, capacity, damp, density, dtype=dtype, block=block)
    for step in range(2 * capacity + 1):
        g = torch.randn(dim, generator=gen) * 10.0 ** (step % 5 - 2)  # scales over four orders
        out = window.push_ihvp(g)
        fisher = dense_fisher(held_rows(window), damp)
        compressed = held_rows(window)[(window.pushed - 1) % capacity]
        assert rel_err(out, solve(fisher, compressed)) <= tolerance(fisher, torch.float32)
    x = torch.randn(dim, generator=gen)
    check_against_dense(window, damp, x)
    batch = torch.randn(3, dim, generator=gen)
    fisher = dense_fisher(held_rows(window), damp)
    assert rel_err(window.ihvp(batch), solve(fisher, batch.T).T) <= tolerance(fisher, torch.float32)


def test_push_ihvp_of_another_vector_uses_the_window_with_the_new_row():
    """push_ihvp(g, x): F^-1 x with the compressed g in the window, against a dense float64 solve;
    a bad x is refused before the window changes."""
    gen = torch.Generator().manual_seed(11)
    window = CompressedWindowFisherInverse(600, 4, 1e-2, 0.05, block=200)
    for g in torch.randn(5, 600, generator=gen):
        window.push(g)
    g, x = torch.randn(600, generator=gen), torch.randn(600, generator=gen)
    out = window.push_ihvp(g, x)
    fisher = dense_fisher(held_rows(window), 1e-2)
    assert rel_err(out, solve(fisher, x)) <= tolerance(fisher, torch.float32)
    assert rel_err(window.push_ihvp(g, g), solve(dense_fisher(held_rows(window), 1e-2), g)) <= 1e-4
    before = window.state_dict()
    with pytest.raises(ValueError, match="shape"):
        window.push_ihvp(g, torch.randn(2, 600))
    assert state_equal(window.state_dict(), before)


def test_top_k_per_block_and_error_feedback_lose_nothing():
    dim, block, density = 1000, 300, 0.03
    window = CompressedWindowFisherInverse(dim, 4, 1e-2, density, block=block)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        g = torch.randn(dim, generator=gen)
        accumulated = window.residual + g
        window.push(g)
        kept = held_rows(window)[(window.pushed - 1) % 4].float()
        # error feedback: what was kept plus the new residual is exactly what was offered
        assert torch.equal(kept + window.residual, accumulated)
        for start in range(0, dim, block):
            part, chosen = accumulated[start:start + block], kept[start:start + block]
            count = math.ceil(density * part.numel())
            assert int((chosen != 0).sum()) == count
            threshold = part.abs().topk(count).values[-1]
            assert bool((part.abs()[chosen != 0] >= threshold).all())
            assert bool((window.residual[start:start + block].abs() <= threshold).all())


def test_density_one_is_the_dense_window():
    dim, capacity, damp = 400, 5, 1e-3
    gen = torch.Generator().manual_seed(2)
    compressed = CompressedWindowFisherInverse(dim, capacity, damp, 1.0, block=128)
    dense = SlidingWindowFisherInverse(dim, capacity, damp)
    for _ in range(8):
        g = torch.randn(dim, generator=gen)
        assert rel_err(compressed.push_ihvp(g), dense.push_ihvp(g)) <= 1e-5
    assert torch.equal(compressed.residual, torch.zeros(dim))
    x = torch.randn(dim, generator=gen)
    assert rel_err(compressed.ihvp(x), dense.ihvp(x)) <= 1e-5


def test_all_zero_gradients_and_empty_window():
    window = CompressedWindowFisherInverse(200, 3, 0.5, 0.1, block=64)
    x = torch.randn(200)
    assert torch.allclose(window.ihvp(x), x / 0.5)
    for _ in range(4):
        out = window.push_ihvp(torch.zeros(200))
        assert torch.equal(out, torch.zeros(200))
    assert torch.allclose(window.ihvp(x), x / 0.5)
    assert torch.allclose(window.diag(), torch.full((200,), 2.0))


@given(seed=st.integers(0, 10_000), capacity=st.integers(1, 6), density=st.floats(0.01, 1.0),
       block=st.integers(16, 400), log_damp=st.floats(-6, 2), scales=st.lists(st.floats(-6, 6), min_size=1,
                                                                              max_size=10))
def test_backward_stable_on_any_stream(seed, capacity, density, block, log_damp, scales):
    dim, damp = 401, 10.0 ** log_damp
    gen = torch.Generator().manual_seed(seed)
    window = CompressedWindowFisherInverse(dim, capacity, damp, density, block=block)
    first = torch.randn(dim, generator=gen)
    for exponent in scales:
        kind = int(torch.randint(3, (1,), generator=gen))
        g = (torch.randn(dim, generator=gen), first.clone(), torch.zeros(dim))[kind] * 10.0 ** exponent
        try:
            window.push(g)
        except NonFiniteGradientError:  # an overflowing dot product at the extreme scales: refused whole
            continue
    fisher = dense_fisher(held_rows(window), damp)
    for x in (torch.randn(dim, generator=gen), held_rows(window)[0].float() if window.num_grads else first):
        if float(x.norm()) > 0:
            assert rel_err(window.ihvp(x), solve(fisher, x)) <= tolerance(fisher, torch.float32)


def test_state_round_trip_is_bitwise_and_resume_is_exact():
    dim, capacity = 500, 4
    gen = torch.Generator().manual_seed(3)
    stream = torch.randn(10, dim, generator=gen)
    window = CompressedWindowFisherInverse(dim, capacity, 1e-3, 0.05, dtype=torch.bfloat16, block=128)
    for g in stream[:5]:
        window.push(g)
    buffer = io.BytesIO()
    torch.save(window.state_dict(), buffer)
    buffer.seek(0)
    restored = CompressedWindowFisherInverse(dim, capacity, 1e-3, 0.05, dtype=torch.bfloat16, block=128)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for g in stream[5:]:
        assert torch.equal(window.push_ihvp(g), restored.push_ihvp(g))
    for key, value in window.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]) if isinstance(value, torch.Tensor) \
            else value == restored.state_dict()[key]


def state_equal(a: dict, b: dict) -> bool:
    return all(torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k] for k, v in a.items())


@pytest.mark.parametrize("corrupt,message", [
    (lambda s: s["offsets"].__setitem__(0, 200), "outside their blocks"),
    (lambda s: s["offsets"].__setitem__(0, -1), "outside their blocks"),
    (lambda s: s["offsets"].__setitem__(-1, 116), "outside their blocks"),  # past the short last block
    (lambda s: s.__setitem__("density", 0.5), "density"),
    (lambda s: s.__setitem__("residual", torch.full((500,), math.nan)), "NaN"),
    (lambda s: s["gram"].__setitem__((0, 0), 1e6), "gram"),
    (lambda s: s["values"].__setitem__(-1, 1.0), "beyond"),  # an entry in the empty fourth slot
    (lambda s: s.pop("residual"), "missing"),
    (lambda s: s.__setitem__("values", s["values"].double()), "values"),
])
def test_corrupt_state_is_refused_and_window_unchanged(corrupt, message):
    window = CompressedWindowFisherInverse(500, 4, 1e-3, 0.05, block=128)  # last block: 116 coordinates
    for g in torch.randn(3, 500, generator=torch.Generator().manual_seed(4)):
        window.push(g)
    state = window.state_dict()
    corrupt(state)
    before = window.state_dict()
    with pytest.raises(ValueError, match=message):
        window.load_state_dict(state)
    assert state_equal(window.state_dict(), before)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_gradient_changes_nothing(bad):
    window = CompressedWindowFisherInverse(300, 3, 1e-3, 0.1, block=64)
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        window.push(torch.randn(300, generator=gen))
    before = window.state_dict()
    poisoned = torch.randn(300, generator=gen)
    poisoned[7] = bad
    for method in (window.push, window.push_ihvp, lambda g: window.extend(g[None])):
        with pytest.raises(NonFiniteGradientError):
            method(poisoned)
        assert state_equal(window.state_dict(), before)


def test_extend_equals_pushing_one_at_a_time():
    gen = torch.Generator().manual_seed(6)
    grads = torch.randn(7, 300, generator=gen)
    one, batch = (CompressedWindowFisherInverse(300, 4, 1e-2, 0.1, block=100) for _ in range(2))
    one.push(grads[0])
    batch.push(grads[0])
    for g in grads[1:]:
        one.push(g)
    batch.extend(grads[1:])
    assert torch.equal(one.residual, batch.residual)
    assert torch.equal(held_rows(one), held_rows(batch))
    x = torch.randn(300, generator=gen)
    assert rel_err(batch.ihvp(x), one.ihvp(x)) <= 1e-5


def test_bad_arguments_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="dim > window"):
        CompressedWindowFisherInverse(10, 10, 1e-3, 0.5)
    for density in (0, 1.5, math.nan, True):
        with pytest.raises(ValueError, match="density"):
            CompressedWindowFisherInverse(100, 4, 1e-3, density)
    with pytest.raises(ValueError, match="block"):
        CompressedWindowFisherInverse(100_000, 4, 1e-3, 0.1, block=40_000)
    with pytest.raises(TypeError, match="bfloat16"):
        CompressedWindowFisherInverse(100, 4, 1e-3, 0.1, dtype=torch.float16)
    with pytest.raises(InsufficientMemoryError, match="lower window or density"):
        CompressedWindowFisherInverse(10**12, 1024, 1e-3, 0.1)
    # m = 1024 at 1% of MiniLM-L6: 4 bytes per kept entry (bfloat16 value, int16 offset) plus three d-vectors
    assert 0.93e9 < compressed_nbytes(22_700_000, 1024, 0.01, torch.bfloat16) < 1.3e9


# The compiled kernels against the torch fallback ------------------------------------------------------


@pytest.fixture
def without_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "_usable", lambda *tensors: None)


def test_kernels_status_is_reported():
    assert isinstance(kernels.status(), str) and kernels.status()


@pytest.mark.skipif(not kernels.available(), reason=f"compiled kernels unavailable: {kernels.status()}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressed_kernels_equal_the_torch_fallback(dtype, monkeypatch):
    gen = torch.Generator().manual_seed(7)
    grads = torch.randn(9, 70_001, generator=gen)
    x = torch.randn(70_001, generator=gen)
    results = []
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(kernels, "_usable", lambda *tensors: None)
        window = CompressedWindowFisherInverse(70_001, 6, 1e-3, 0.02, dtype=dtype)
        results.append(torch.stack([window.push_ihvp(g) for g in grads] + [window.ihvp(x)]))
    assert rel_err(results[0], results[1]) <= 1e-5


@pytest.mark.skipif(not kernels.available(), reason=f"compiled kernels unavailable: {kernels.status()}")
def test_bfloat16_window_kernel_equals_upcasting_first(monkeypatch):
    """The kernel reads bfloat16 rows and accumulates in float32: the same numbers as converting the
    rows to float32 first, up to float32 rounding."""
    gen = torch.Generator().manual_seed(8)
    d, capacity = 50_003, 7
    grads = torch.randn(10, d, generator=gen)
    x = torch.randn(d, generator=gen)
    results = []
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(kernels, "_usable", lambda *tensors: None)
        window = SlidingWindowFisherInverse(d, capacity, 1e-4, dtype=torch.bfloat16)
        results.append(torch.stack([window.push_ihvp(g) for g in grads] + [window.ihvp(x)]))
    assert rel_err(results[0], results[1]) <= 1e-5
    upcast = SlidingWindowFisherInverse(d, capacity, 1e-4, dtype=torch.float32)
    for g in grads:
        upcast.push(g.bfloat16().float())
    assert rel_err(results[0][-1], upcast.ihvp(x)) <= 1e-5


def test_fallback_window_matches_dense_inverse(without_kernels):
    window = CompressedWindowFisherInverse(700, 5, 1e-3, 0.05, dtype=torch.bfloat16, block=256)
    for g in torch.randn(7, 700, generator=torch.Generator().manual_seed(9)):
        window.push(g)
    check_against_dense(window, 1e-3, torch.randn(700))


def test_without_a_compiler_everything_falls_back_to_torch(tmp_path):
    """No compiler (or MFAC_KERNELS=0): the status says why, and the window still works."""
    import os
    import subprocess
    import sys

    script = ("import torch; from mfac import kernels; from mfac.fisher import CompressedWindowFisherInverse as C\n"
              "w = C(3000, 4, 1e-3, 0.05)\n"
              "for g in torch.randn(5, 3000): u = w.push_ihvp(g)\n"
              "print(kernels.available(), '|', kernels.status(), '|', bool(torch.isfinite(u).all()))")
    for extra in ({"CC": str(tmp_path / "no-such-compiler")}, {"MFAC_KERNELS": "0"}):
        env = {**os.environ, "MFAC_KERNEL_CACHE": str(tmp_path / "cache"), **extra}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        available, status, finite = done.stdout.strip().split(" | ")
        assert available == "False" and finite == "True"
        assert ("no C compiler" in status) if "CC" in extra else ("MFAC_KERNELS=0" in status)
    assert not any((tmp_path / "cache").glob("*.so"))


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressed_window_on_device(device, dtype):
    """On a GPU the products take the torch route; the results must still be F^-1 over the rows held."""
    window = CompressedWindowFisherInverse(900, 5, 1e-3, 0.05, dtype=dtype, device=device, block=256)
    gen = torch.Generator().manual_seed(10)
    for g in torch.randn(7, 900, generator=gen):
        out = window.push_ihvp(g.to(device))
    assert out.device.type == device and window.residual.device.type == device
    x = torch.randn(900, generator=gen)
    fisher = dense_fisher(held_rows(window).cpu(), 1e-3)
    assert rel_err(window.ihvp(x.to(device)).cpu(), solve(fisher, x)) <= tolerance(fisher, torch.float32)


@pytest.mark.skipif(not kernels.available(), reason=f"compiled kernels unavailable: {kernels.status()}")
@pytest.mark.parametrize("m", [1, 3, 4, 5, 8, 9])
def test_dense_bfloat16_kernels_against_float64(m):
    """G x and beta x + alpha G^T a on bfloat16 rows, for row counts around the kernels' groups of four
    and a width that ends mid-vector and mid-block, against the same products in float64."""
    gen = torch.Generator().manual_seed(m)
    d = 2 * 8192 + 13
    rows = (torch.randn(m, d, generator=gen) * torch.logspace(-3, 3, m)[:, None]).bfloat16()
    x, a = torch.randn(d, generator=gen), torch.randn(m, generator=gen)
    exact_rows = rows.double()
    dots = kernels.dense_dots(rows, x)
    assert rel_err(dots, exact_rows @ x.double()) <= 1e-5
    combined = kernels.dense_combine(rows, a, x.clone(), 0.5, -2.0)
    assert rel_err(combined, 0.5 * x.double() - 2.0 * exact_rows.T @ a.double()) <= 1e-5


@pytest.mark.skipif(not kernels.available(), reason=f"compiled kernels unavailable: {kernels.status()}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim, block, density", [(70_001, 8192, 0.01), (1000, 300, 0.03), (257, 64, 1.0), (5, 64, 0.5)])
def test_compression_kernel_keeps_what_torch_topk_keeps(dtype, dim, block, density, monkeypatch):
    """The one-pass compression kernel (radix selection per block) keeps the same entries as torch's
    top-k, rounds them the same way, and leaves the same residual, bit for bit, over a stream of
    pushes whose residual grows (no ties in random data); a short last block included."""
    gen = torch.Generator().manual_seed(12)
    grads = torch.randn(7, dim, generator=gen) * torch.logspace(-3, 3, 7)[:, None]
    windows = []
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(kernels, "compress_blocks", lambda *args: None)
        window = CompressedWindowFisherInverse(dim, 4, 1e-3, density, block=block, dtype=dtype)
        for g in grads:
            window.push(g)
        windows.append(window)
    assert torch.equal(held_rows(windows[0]), held_rows(windows[1]))
    assert torch.equal(windows[0].residual, windows[1].residual)


@pytest.mark.skipif(not kernels.available(), reason=f"compiled kernels unavailable: {kernels.status()}")
def test_compression_kernel_breaks_ties_by_lowest_coordinate():
    """A block with fewer non-zeros than it keeps (an all-zero gradient, a sparse one) fills up with
    the lowest-numbered zeros: deterministic, whatever the selection order."""
    window = CompressedWindowFisherInverse(256, 2, 1e-3, 0.05, block=64)
    g = torch.zeros(256)
    g[70] = 2.0
    window.push(g)
    state = window.state_dict()
    offsets = state["offsets"].reshape(-1) if "offsets" in state else None
    kept = held_rows(window)[0]
    assert int((kept != 0).sum()) == 1 and float(kept[70]) == 2.0
    if offsets is not None:
        per_block = math.ceil(0.05 * 64)
        first_row = [sorted(int(o) for o in offsets[b * 2 * per_block: b * 2 * per_block + per_block])
                     for b in range(4)]
        assert first_row == [[0, 1, 2, 3], [0, 1, 2, 6], [0, 1, 2, 3], [0, 1, 2, 3]]


@pytest.mark.skipif(not kernels.available(), reason=f"compiled kernels unavailable: {kernels.status()}")
def test_compression_kernel_names_an_overflowing_sum():
    """The kernel tells a non-finite gradient from a finite one whose sum with the residual leaves
    float32; a float64 g beyond float32 (finite as given) gets the overflow message from the window,
    which is left unchanged."""
    layout = kernels.BlockLayout.build(128, 0.01, 64, 2)
    big = torch.full((128,), 3e38)
    assert kernels.compress_blocks(layout, big, big, torch.float32)[0] == "sum"
    nan = torch.zeros(128)
    nan[100] = math.nan
    assert kernels.compress_blocks(layout, torch.zeros(128), nan, torch.float32)[0] == "gradient"
    problem, values, offsets, stored, residual = kernels.compress_blocks(layout, torch.zeros(128), big / 4,
                                                                         torch.bfloat16)
    assert problem is None and values.dtype == torch.bfloat16 and offsets.tolist() == [0, 0]
    window = CompressedWindowFisherInverse(128, 2, 1e-3, 0.01, block=64)
    window.push(torch.randn(128))
    before = window.state_dict()
    with pytest.raises(NonFiniteGradientError, match="overflows float32"):
        window.push(torch.full((128,), 1e300, dtype=torch.float64))
    assert state_equal(window.state_dict(), before)


@pytest.mark.skipif(not kernels.available(), reason=f"compiled kernels unavailable: {kernels.status()}")
def test_reused_buffers_never_change_a_live_push():
    """A push's dense buffers are reused by later pushes only once it is written: two pushes staged
    at once, the first committed, give the window that pushing the first alone gives; and the dense
    row of a spent push passed back as a gradient gives what a copy of it gives."""
    gen = torch.Generator().manual_seed(5)
    grads = torch.randn(6, 3000, generator=gen) * torch.logspace(0, 2, 6)[:, None]
    window, reference = (CompressedWindowFisherInverse(3000, 3, 1e-3, 0.02, block=512) for _ in range(2))
    for g in grads[:3]:
        window.push(g)
        reference.push(g)
    first, second = window.stage(grads[3]), window.stage(grads[4])
    window.commit(first)
    expected = reference.push_ihvp(grads[3])
    assert torch.equal(first.direction, expected)
    assert torch.equal(held_rows(window), held_rows(reference)) and torch.equal(window.residual, reference.residual)
    with pytest.raises(ValueError, match="stage it again"):
        window.commit(second)
    row = first.stored.clone()
    window.push(first.stored)  # its memory is a spare of the window's now
    reference.push(row)
    assert torch.equal(held_rows(window), held_rows(reference)) and torch.equal(window.residual, reference.residual)
    assert torch.equal(window.push_ihvp(grads[5]), reference.push_ihvp(grads[5]))
