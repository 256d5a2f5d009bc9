"""The Triton kernels for GPU windows, run by Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1) and checked against torch in float64; on a CUDA device, also natively."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from mfac.fisher import CompressedWindowFisherInverse  # noqa: E402
from mfac.kernels import triton_window  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # set by conftest.py before triton was imported


@pytest.fixture(params=[pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETED, reason="TRITON_INTERPRET=0")),
                        pytest.param("cuda", marks=CUDA)])
def device(request):
    return torch.device(request.param)


@pytest.mark.parametrize("k,d", [(1, 1), (3, 1500), (17, 2049), (40, 300)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dense_products_match_float64(device, k, d, dtype):
    generator = torch.Generator().manual_seed(k * d)
    rows = (torch.randn(k, d, generator=generator) * torch.logspace(-2, 2, d)).to(dtype).to(device)
    x = torch.randn(d, generator=generator).to(device)
    a = torch.randn(k, generator=generator).to(device)
    assert triton_window.usable(rows, x)
    exact = rows.double() @ x.double()
    dots = triton_window.dense_dots(rows, x)
    assert dots.dtype == torch.float64 and dots.shape == (k,)
    scale = (rows.double().abs() @ x.double().abs()).clamp_min(1e-30)
    assert bool(((dots - exact).abs() <= 1e-5 * scale).all())
    combined = triton_window.dense_combine(rows, a, x, 0.5, -2.0)
    expected = 0.5 * x.double() - 2.0 * rows.double().T @ a.double()
    bound = 0.5 * x.double().abs() + 2.0 * rows.double().abs().T @ a.double().abs()
    assert combined.dtype == torch.float32 and bool(((combined.double() - expected).abs() <= 1e-5 * bound + 1e-30).all())


@pytest.mark.parametrize("dim,window,density,block,dtype", [
    (5000, 6, 0.05, 1024, torch.bfloat16), (700, 3, 0.1, 256, torch.float32), (64, 2, 0.5, 64, torch.float32),
    (3001, 4, 0.01, 1000, torch.bfloat16)])
def test_compressed_products_match_float64(device, dim, window, density, block, dtype):
    generator = torch.Generator().manual_seed(dim)
    fisher = CompressedWindowFisherInverse(dim, window, 1e-2, density, dtype=dtype, block=block)
    for _ in range(window + 1):
        fisher.push(torch.randn(dim, generator=generator))
    held = fisher.rows()  # (k, d) float64, slot order
    state = fisher.storage.state_tensors()
    layout = fisher.storage.layout
    to = {"device": device}
    layout = type(layout)(layout.block, layout.capacity, *(t.to(**to) for t in (layout.starts, layout.bases,
                                                                                 layout.first, layout.kept)))
    values, offsets = state["values"].to(**to), state["offsets"].to(**to)
    x = torch.randn(dim, generator=generator)
    a = torch.randn(held.shape[0], generator=generator, dtype=torch.float64)
    dots = triton_window.sparse_dots(layout, values, offsets, held.shape[0], x.to(**to)).cpu()
    assert torch.allclose(dots, held @ x.double(), rtol=1e-5, atol=1e-6)
    combined = triton_window.sparse_combine(layout, values, offsets, held.shape[0], a.to(**to), x.to(**to), 0.25, 3.0)
    assert torch.allclose(combined.cpu().double(), 0.25 * x.double() + 3.0 * held.T @ a, rtol=1e-5, atol=1e-5)
    again = triton_window.sparse_combine(layout, values, offsets, held.shape[0], a.to(**to), x.to(**to), 0.25, 3.0)
    assert torch.equal(again, combined)  # rows are added in order: deterministic


@pytest.mark.skipif(not INTERPRETED, reason="TRITON_INTERPRET=0")
def test_cpu_tensors_take_triton_only_when_asked(monkeypatch):
    monkeypatch.delenv("MFAC_KERNELS", raising=False)
    assert triton_window.usable(torch.zeros(3)) and not triton_window.selected(torch.zeros(3))
    monkeypatch.setenv("MFAC_KERNELS", "triton")
    assert triton_window.selected(torch.zeros(3))


@pytest.mark.skipif(not INTERPRETED, reason="TRITON_INTERPRET=0")
@pytest.mark.parametrize("form", ["bfloat16", "compressed"])
def test_windows_take_the_triton_kernels_when_asked(monkeypatch, form):
    """The window's products go through the Triton kernels (as they do for CUDA tensors) and give
    the results of the CPU kernels."""
    from mfac.fisher import SlidingWindowFisherInverse

    def run():
        generator = torch.Generator().manual_seed(0)
        if form == "compressed":
            fisher = CompressedWindowFisherInverse(3000, 4, 1e-2, 0.05, dtype=torch.bfloat16, block=512)
        else:
            fisher = SlidingWindowFisherInverse(3000, 4, 1e-2, dtype=torch.bfloat16)
        directions = [fisher.push_ihvp(torch.randn(3000, generator=generator)) for _ in range(6)]
        return torch.stack(directions), fisher.ihvp(torch.randn(3000, generator=generator))

    calls = []
    for name in ("dense_dots", "dense_combine", "sparse_dots", "sparse_combine"):
        original = getattr(triton_window, name)
        monkeypatch.setattr(triton_window, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    monkeypatch.delenv("MFAC_KERNELS", raising=False)
    expected = run()
    assert not calls
    monkeypatch.setenv("MFAC_KERNELS", "triton")
    got = run()
    assert calls  # the Triton kernels ran
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))
