"""Triton kernels for the window products on GPUs: bfloat16 rows with float32 accumulation, and
compressed rows of (value, int16 offset) pairs laid out as :class:`mfac.kernels.BlockLayout`.

torch has no product of a bfloat16 matrix with a float32 vector that accumulates in float32 without
upcasting the matrix (a copy as large as the window), nor a sparse format at memory speed, so these
four products are written once, for CUDA tensors, with the same meaning as the CPU kernels of
``window.c``:

* :func:`dense_dots`: rows @ x, float32 partial sums over chunks of coordinates, summed in float64.
* :func:`dense_combine`: beta * x + alpha * rows^T a, float32.
* :func:`sparse_dots` / :func:`sparse_combine`: the same over a compressed window.

Every kernel reads the window once. ``sparse_combine`` scatters one row at a time inside each block
(a row never names a coordinate twice), so its sums are deterministic, as on the CPU.

Triton's interpreter (``TRITON_INTERPRET=1``) runs these kernels on CPU tensors, which is how the
test suite checks them against torch on machines without a GPU. Needs ``pip install triton``
(Linux; the ``[triton]`` extra); :func:`available` says whether it can be used.
"""

from __future__ import annotations

import functools
import math
import os

import torch

__all__ = ["available", "usable", "selected", "dense_dots", "dense_combine", "sparse_dots", "sparse_combine"]

_CHUNK = 1024  # coordinates per program in the dense kernels
_ROWS = 16  # rows per program in the dense kernels


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    return triton, tl


def available() -> bool:
    """Whether Triton is installed (the kernels then run on CUDA tensors, or anywhere under
    ``TRITON_INTERPRET=1``)."""
    return _triton() is not None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can go through the Triton kernels: all on a CUDA device (or on the CPU
    under Triton's interpreter), with Triton installed."""
    if not available():
        return False
    if _interpreting():
        return all(t.device.type == "cpu" for t in tensors)
    return all(t.is_cuda for t in tensors)


def selected(*tensors: torch.Tensor) -> bool:
    """Whether the window products should take these kernels: CUDA tensors whenever Triton is
    installed; CPU tensors only under the interpreter and when asked with ``MFAC_KERNELS=triton``
    (for tests: the CPU has faster kernels of its own)."""
    if not usable(*tensors):
        return False
    return not _interpreting() or os.environ.get("MFAC_KERNELS") == "triton"


@functools.cache
def _kernels(interpret: bool):
    """Compile (or, under the interpreter, wrap) the kernels once per mode."""
    triton, tl = _triton()

    @triton.jit
    def dense_dots_kernel(rows, x, partial, k, d, n_chunks, ROWS: tl.constexpr, CHUNK: tl.constexpr):
        r0 = tl.program_id(0) * ROWS
        c0 = tl.program_id(1) * CHUNK
        r = r0 + tl.arange(0, ROWS)
        c = c0 + tl.arange(0, CHUNK)
        tile = tl.load(rows + r[:, None].to(tl.int64) * d + c[None, :], mask=(r[:, None] < k) & (c[None, :] < d),
                       other=0.0).to(tl.float32)
        xs = tl.load(x + c, mask=c < d, other=0.0)
        tl.store(partial + r.to(tl.int64) * n_chunks + tl.program_id(1), tl.sum(tile * xs[None, :], axis=1), mask=r < k)

    @triton.jit
    def dense_combine_kernel(rows, coeffs, x, out, k, d, beta, alpha, ROWS: tl.constexpr, CHUNK: tl.constexpr):
        c = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
        acc = tl.zeros((CHUNK,), dtype=tl.float32)
        for r0 in range(0, k, ROWS):
            r = r0 + tl.arange(0, ROWS)
            tile = tl.load(rows + r[:, None].to(tl.int64) * d + c[None, :], mask=(r[:, None] < k) & (c[None, :] < d),
                           other=0.0).to(tl.float32)
            a = tl.load(coeffs + r, mask=r < k, other=0.0)
            acc += tl.sum(tile * a[:, None], axis=0)
        xs = tl.load(x + c, mask=c < d, other=0.0)
        tl.store(out + c, beta * xs + alpha * acc, mask=c < d)

    @triton.jit
    def sparse_dots_kernel(values, offsets, starts, x, partial, rows, capacity, n_blocks, block,
                           ROWS: tl.constexpr, KEPT: tl.constexpr):
        b = tl.program_id(0)
        r = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        start = tl.load(starts + b)
        kept = tl.load(starts + b + 1) - start
        t = tl.arange(0, KEPT)
        mask = (r[:, None] < rows) & (t[None, :] < kept)
        pos = capacity * start + r[:, None].to(tl.int64) * kept + t[None, :]
        vals = tl.load(values + pos, mask=mask, other=0.0).to(tl.float32)
        offs = tl.load(offsets + pos, mask=mask, other=0).to(tl.int64)
        xs = tl.load(x + b.to(tl.int64) * block + offs, mask=mask, other=0.0)
        tl.store(partial + r.to(tl.int64) * n_blocks + b, tl.sum(vals * xs, axis=1), mask=r < rows)

    @triton.jit
    def sparse_combine_kernel(values, offsets, starts, coeffs, out, rows, capacity, block, alpha,
                              KEPT: tl.constexpr):
        b = tl.program_id(0)
        start = tl.load(starts + b)
        kept = tl.load(starts + b + 1) - start
        t = tl.arange(0, KEPT)
        mask = t < kept
        for i in range(0, rows):
            pos = capacity * start + i * kept + t
            vals = tl.load(values + pos, mask=mask, other=0.0).to(tl.float32)
            index = b.to(tl.int64) * block + tl.load(offsets + pos, mask=mask, other=0).to(tl.int64)
            a = tl.load(coeffs + i)
            current = tl.load(out + index, mask=mask, other=0.0)
            tl.store(out + index, current + alpha * a * vals, mask=mask)
            tl.debug_barrier()  # the next row may touch the same coordinates from other threads

    return triton, dense_dots_kernel, dense_combine_kernel, sparse_dots_kernel, sparse_combine_kernel


def _launch():
    return _kernels(_interpreting())


def dense_dots(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """rows @ x in float64 for rows (k, d) bfloat16 (or float32) and x (d,) float32: float32 sums
    over chunks of 1024 coordinates, added in float64. One read of rows."""
    triton, kernel, *_ = _launch()
    k, d = rows.shape
    chunks = triton.cdiv(d, _CHUNK)
    partial = torch.empty(k, chunks, dtype=torch.float32, device=rows.device)
    if k:
        kernel[(triton.cdiv(k, _ROWS), chunks)](rows.contiguous(), x.contiguous(), partial, k, d, chunks,
                                                ROWS=_ROWS, CHUNK=_CHUNK)
    return partial.double().sum(1)


def dense_combine(rows: torch.Tensor, coeffs: torch.Tensor, x: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """beta * x + alpha * rows^T coeffs in float32, for rows (k, d), coeffs (k,), x (d,). One read of rows."""
    triton, _, kernel, *_ = _launch()
    k, d = rows.shape
    out = torch.empty(d, dtype=torch.float32, device=x.device)
    kernel[(triton.cdiv(d, _CHUNK),)](rows.contiguous(), coeffs.to(torch.float32).contiguous(),
                                      x.to(torch.float32).contiguous(), out, k, d, float(beta), float(alpha),
                                      ROWS=_ROWS, CHUNK=_CHUNK)
    return out


def _kept_pad(layout) -> int:
    widest = int((layout.starts[1:] - layout.starts[:-1]).max())
    return max(16, 1 << math.ceil(math.log2(widest)))


def sparse_dots(layout, values: torch.Tensor, offsets: torch.Tensor, rows: int, x: torch.Tensor) -> torch.Tensor:
    """G x in float64 for the first ``rows`` rows of a compressed window (layout as
    :class:`mfac.kernels.BlockLayout`) and x (d,) float32. One read of the rows' entries."""
    triton, _, _, kernel, _ = _launch()
    blocks = layout.starts.numel() - 1
    partial = torch.empty(rows, blocks, dtype=torch.float32, device=values.device)
    if rows:
        kernel[(blocks, triton.cdiv(rows, _ROWS))](values, offsets, layout.starts, x.to(torch.float32).contiguous(),
                                                   partial, rows, layout.capacity, blocks, layout.block,
                                                   ROWS=_ROWS, KEPT=_kept_pad(layout))
    return partial.double().sum(1)


def sparse_combine(layout, values: torch.Tensor, offsets: torch.Tensor, rows: int, coeffs: torch.Tensor,
                   x: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """beta * x + alpha * G^T coeffs in float32 over the first ``rows`` rows of a compressed window.
    One read of the entries; deterministic (rows are added in order within each block)."""
    triton, *_, kernel = _launch()
    out = (x.to(torch.float32) * beta).contiguous()
    blocks = layout.starts.numel() - 1
    if rows:
        kernel[(blocks,)](values, offsets, layout.starts, coeffs.to(torch.float32).contiguous(), out, rows,
                          layout.capacity, layout.block, float(alpha), KEPT=_kept_pad(layout))
    return out
