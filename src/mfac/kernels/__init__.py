"""Compiled CPU kernels for the window products, with pure-torch fallbacks.

This module owns one small C file (``window.c``: products with a bfloat16 window, and with a
compressed window of (value, int16 offset) pairs; the window's factor update; the factorisation of
many small blocks) and the bridge to it. torch has no fast product
of a bfloat16 matrix with a float32 vector that accumulates in float32 (its own bfloat16 product
rounds the vector and the result to bfloat16), and its sparse formats are far from memory speed
(BENCHMARKS.md#window-storage-forms), so these few loops are written in C, blocked over columns so the window is
read exactly once per product.

The library is built on first use, not at import, with the system C compiler (``$CC``, default
``cc``, with its arguments if any; flags ``-O3 -march=native -fopenmp``), into
``$MFAC_KERNEL_CACHE`` (default ``~/.cache/mfac/kernels``), keyed by a hash of the source, compiler,
flags and platform, so a later process only loads it: only a library this user built, checked
against the SHA-256 recorded when it was built, from a folder no one else can write
(:mod:`mfac.kernels.build`). Where no compiler is found, the build fails or times out, the library
cannot be loaded or lacks a kernel, the data is not on the CPU, or ``MFAC_KERNELS=0`` is set, every
product falls back to torch: the same results up to float32 rounding, only slower. :func:`status`
says which is in use and why; :func:`reset` forgets the outcome (the next product decides again).
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from dataclasses import dataclass

import torch

from . import triton_window
from .build import BuildError, cache_folder, load_library

__all__ = ["BlockLayout", "available", "status", "reset", "dense_dots", "dense_combine", "sparse_dots",
           "sparse_combine", "compress_blocks", "factor_shift", "gram_update", "inverse_factors",
           "INVERSE_FACTORS_MAX_SIZE"]

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_reason = "not built yet (the kernels are built on first use)"
_tried = False

_P, _I64, _INT, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "dense_dots": [_P, _I64, _I64, _P, _P, _INT],
    "dense_combine": [_P, _I64, _I64, _P, _P, _F32, _F32, _P, _INT],
    "sparse_dots": [_P, _INT, _P, _I64, _I64, _P, _I64, _I64, _P, _P, _INT],
    "sparse_combine": [_P, _INT, _P, _I64, _I64, _P, _I64, _I64, _I64, _P, _P, _F32, _F32, _P, _INT],
    "factor_shift": [_P, _I64, _P, ctypes.c_double, _P, _P, _INT, _P, _P, _P, _P, _P],
    "row_vector_width": [],
    "compress_blocks": [_P, _P, _I64, _I64, _P, _I64, _INT, _P, _P, _P, _P, _INT],
    "gram_update_f32": [_P, _I64, _I64, _I64, _P, _P, _I64, _I64, _INT],
    "gram_update_f64": [_P, _I64, _I64, _I64, _P, _P, _I64, _I64, _INT],
    "inverse_factors_f32": [_P, _I64, _I64, _I64, _P, _P, ctypes.c_double, _P, _P, _INT],
    "inverse_factors_f64": [_P, _I64, _I64, _I64, _P, _P, ctypes.c_double, _P, _P, _INT],
}


def _bind(library: ctypes.CDLL, note: str) -> ctypes.CDLL:
    """Declare every kernel's signature; BuildError if the library lacks one."""
    for name, argtypes in _SIGNATURES.items():
        try:
            function = getattr(library, name)
        except AttributeError:
            raise BuildError(f"the kernel library ({note}) has no {name!r}; it is not built from window.c "
                             f"(check $CC, or delete the cache {cache_folder()})") from None
        function.argtypes, function.restype = argtypes, ctypes.c_int
    return library


def _load() -> ctypes.CDLL | None:
    global _library, _reason, _tried
    if _tried:
        return _library
    with _lock:
        if not _tried:
            if os.environ.get("MFAC_KERNELS", "1") == "0":
                _reason = "disabled by MFAC_KERNELS=0"
            else:
                try:
                    library, note = load_library()
                    _library = _bind(library, note)
                    width = _library.row_vector_width()
                    vectors = f"{width}-float vectors" if width else "portable loops"
                    _reason = f"compiled kernels in use ({note}; bfloat16 rows in {vectors})"
                except Exception as error:  # any failure to build, load or bind: torch does the products
                    _reason = f"torch fallback: {error}"
            _tried = True
    return _library


def reset() -> None:
    """Forget whether the kernels were loaded and why (for tests, or after changing ``CC`` or
    ``MFAC_KERNEL_CACHE``): the next product builds or loads them again. A library already loaded
    stays mapped but is no longer used until then."""
    global _library, _reason, _tried
    with _lock:
        _library, _reason, _tried = None, "not built yet (the kernels are built on first use)", False


def available() -> bool:
    """Whether the compiled kernels are in use (builds them on the first call)."""
    return _load() is not None


def status() -> str:
    """One line: whether the compiled kernels are in use, or why the torch fallback is."""
    _load()
    return _reason


def _usable(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The library, if every tensor is a contiguous CPU tensor and the kernels are available."""
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return None
    return _load()


def _call(function, *args) -> None:
    if function(*args, torch.get_num_threads()) != 0:
        raise MemoryError(f"{function.__name__}: the kernel could not allocate its per-thread buffers")


# Dense bfloat16 rows --------------------------------------------------------------------------------


def dense_dots(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """rows @ x in float64, for rows (k, d) bfloat16 and x (d,) float32, accumulated in float32
    within column blocks of 8192 to 65536 coordinates (on GPUs: the Triton kernel, chunks of 1024).
    One read of rows; O(k d)."""
    if triton_window.selected(rows, x):
        return triton_window.dense_dots(rows, x)
    out = torch.empty(rows.shape[0], dtype=torch.float64, device=rows.device)
    library = _usable(rows, x) if rows.dtype == torch.bfloat16 and x.dtype == torch.float32 else None
    if library is None or rows.shape[0] == 0:
        for start in range(0, rows.shape[0], 64):  # upcast a few rows at a time
            out[start:start + 64] = (rows[start:start + 64].float() @ x.float()).double()
        return out
    _call(library.dense_dots, rows.data_ptr(), rows.shape[0], rows.shape[1], x.data_ptr(), out.data_ptr())
    return out


def dense_combine(rows: torch.Tensor, coeffs: torch.Tensor, x: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """beta * x + alpha * rows^T coeffs in float32, for rows (k, d) bfloat16, coeffs (k,) and
    x (d,). One read of rows; O(k d)."""
    if triton_window.selected(rows, x):
        return triton_window.dense_combine(rows, coeffs, x, beta, alpha)
    coeffs = coeffs.to(torch.float32).contiguous()
    library = _usable(rows, x) if rows.dtype == torch.bfloat16 and x.dtype == torch.float32 else None
    if library is None:
        out = x.float() * beta
        for chunk, part in zip(rows.split(64), coeffs.split(64)):
            out = torch.addmv(out, chunk.float().T, part, alpha=alpha)
        return out
    out = torch.empty_like(x)
    _call(library.dense_combine, rows.data_ptr(), rows.shape[0], rows.shape[1], coeffs.data_ptr(), x.data_ptr(),
          beta, alpha, out.data_ptr())
    return out


# Compressed rows: (value, offset) pairs in blocks ------------------------------------------------------


@dataclass(frozen=True)
class BlockLayout:
    """Where the entries of a compressed window live.

    Every row keeps ``starts[b+1] - starts[b]`` entries in block b (coordinates ``b * block`` to
    ``(b+1) * block - 1``), nnz = ``starts[-1]`` in all. Storage is block-major: the entries of
    block b of all ``capacity`` rows form one contiguous run, row after row, so a product reads
    each block's run front to back while x (or the accumulator) for that block stays in cache.
    Entry e of row i is at flat position ``first[e] + i * kept[e]`` of the (capacity * nnz,)
    values and int16 offsets; its coordinate is ``bases[e] + offset``.
    """

    block: int
    capacity: int
    starts: torch.Tensor  # (blocks + 1,) int64
    bases: torch.Tensor  # (nnz,) int64: first coordinate of entry e's block
    first: torch.Tensor  # (nnz,) int64: flat position of entry e in row 0
    kept: torch.Tensor  # (nnz,) int64: entries per row in entry e's block

    @staticmethod
    def entries_per_block(dim: int, density: float, block: int) -> list[int]:
        """Entries every row keeps in each block: ceil(density * block size), at least one."""
        return [max(1, math.ceil(density * min(block, dim - start))) for start in range(0, dim, block)]

    @staticmethod
    def entries(dim: int, density: float, block: int) -> int:
        """nnz: the sum of :meth:`entries_per_block`, in O(1) (full blocks, then a shorter last one)."""
        full, last = divmod(dim, block)
        return full * max(1, math.ceil(density * block)) + (max(1, math.ceil(density * last)) if last else 0)

    @classmethod
    def build(cls, dim: int, density: float, block: int, capacity: int, device=None) -> "BlockLayout":
        per_block = torch.tensor(cls.entries_per_block(dim, density, block), dtype=torch.int64)
        starts = torch.zeros(per_block.numel() + 1, dtype=torch.int64)
        starts[1:] = per_block.cumsum(0)
        blocks = torch.repeat_interleave(torch.arange(per_block.numel(), dtype=torch.int64), per_block)
        within = torch.arange(int(starts[-1]), dtype=torch.int64) - starts[blocks]
        tensors = dict(starts=starts, bases=blocks * block, first=capacity * starts[blocks] + within,
                       kept=per_block[blocks])
        return cls(block, capacity, **{key: value.to(device) for key, value in tensors.items()})

    @property
    def nnz(self) -> int:
        return self.bases.numel()

    def positions(self, rows: torch.Tensor) -> torch.Tensor:
        """Flat positions of every entry of the given rows (n,) int64: (n, nnz) int64."""
        return self.first + rows[:, None] * self.kept


def _value_kind(values: torch.Tensor) -> int:
    return {torch.float32: 0, torch.bfloat16: 1}[values.dtype]


def _row_chunks(layout: BlockLayout, rows: int):
    """(first row, flat positions) for the rows held, 64 rows at a time: the fallback's gathers."""
    for start in range(0, rows, 64):
        index = torch.arange(start, min(start + 64, rows), device=layout.first.device)
        yield start, layout.positions(index)


def sparse_dots(layout: BlockLayout, values: torch.Tensor, offsets: torch.Tensor, rows: int,
                x: torch.Tensor) -> torch.Tensor:
    """G x in float64 for the first ``rows`` rows of a compressed window and x (d,) float32.

    ``values`` (capacity * nnz,) float32 or bfloat16 and ``offsets`` (capacity * nnz,) int16 are
    laid out as :class:`BlockLayout` says. One read of the rows' entries (rows * nnz * (2 + value
    bytes) bytes); O(rows * nnz)."""
    if triton_window.selected(values, x):
        return triton_window.sparse_dots(layout, values, offsets, rows, x)
    out = torch.empty(rows, dtype=torch.float64, device=values.device)
    library = _usable(values, offsets, layout.starts, x) if x.dtype == torch.float32 else None
    if library is None or rows == 0:
        for start, positions in _row_chunks(layout, rows):
            index = offsets[positions].long() + layout.bases
            out[start:start + positions.shape[0]] = (values[positions].float() * x.float()[index]).sum(1).double()
        return out
    _call(library.sparse_dots, values.data_ptr(), _value_kind(values), offsets.data_ptr(), rows, layout.capacity,
          layout.starts.data_ptr(), layout.starts.numel() - 1, layout.block, x.data_ptr(), out.data_ptr())
    return out


def sparse_combine(layout: BlockLayout, values: torch.Tensor, offsets: torch.Tensor, rows: int,
                   coeffs: torch.Tensor, x: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """beta * x + alpha * G^T coeffs in float32 for the first ``rows`` rows of a compressed window
    (as in :func:`sparse_dots`), coeffs (rows,) and x (d,). One read of the entries; O(rows nnz + d)."""
    if triton_window.selected(values, x):
        return triton_window.sparse_combine(layout, values, offsets, rows, coeffs, x, beta, alpha)
    coeffs = coeffs.to(torch.float32).contiguous()
    library = _usable(values, offsets, layout.starts, x) if x.dtype == torch.float32 else None
    if library is None:
        out = x.float() * beta
        for start, positions in _row_chunks(layout, rows):
            index = offsets[positions].long() + layout.bases
            weighted = values[positions].float() * coeffs[start:start + positions.shape[0], None]
            out.index_add_(0, index.reshape(-1), weighted.reshape(-1), alpha=alpha)
        return out
    out = torch.empty_like(x)
    _call(library.sparse_combine, values.data_ptr(), _value_kind(values), offsets.data_ptr(), rows, layout.capacity,
          layout.starts.data_ptr(), layout.starts.numel() - 1, layout.block, x.shape[0], coeffs.data_ptr(),
          x.data_ptr(), beta, alpha, out.data_ptr())
    return out


def compress_blocks(layout: BlockLayout, residual: torch.Tensor, g: torch.Tensor, dtype: torch.dtype,
                    out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """One gradient into a compressed row, in one pass: with acc = residual + g ((d,) float32 each,
    contiguous, CPU), keep each block's entries of largest magnitude (as many as ``layout`` says;
    ties: lowest coordinate first), rounded to ``dtype`` (float32 or bfloat16, as torch rounds).

    Returns None where the compiled kernel cannot run (the caller uses torch's top-k); else
    (problem, values, offsets, stored, new_residual): problem is None, "gradient" (g holds NaN or
    Inf) or "sum" (g is finite, acc is not), and then the rest must be discarded; values ((nnz,)
    ``dtype``) and int16 offsets in the layout's entry order, stored ((d,) float32: the kept values
    as stored, zeros elsewhere) and new_residual = acc - stored. ``out``: two (d,) float32
    contiguous tensors to write stored and new_residual into (every entry is written), sharing no
    memory with ``residual`` or ``g``; fresh ones otherwise. Cost: one pass over d, plus a
    three-round radix selection per block (no sort)."""
    tensors = (residual, g)
    if dtype not in (torch.float32, torch.bfloat16) or any(t.dtype != torch.float32 or t.dim() != 1 for t in tensors):
        return None
    library = _usable(residual, g, layout.starts)
    if library is None or residual.shape != g.shape or layout.block > -torch.iinfo(torch.int16).min:
        return None
    d, blocks = g.shape[0], layout.starts.numel() - 1
    values = torch.empty(layout.nnz, dtype=dtype)
    offsets = torch.empty(layout.nnz, dtype=torch.int16)
    stored, new_residual = out if out is not None else (torch.empty(d), torch.empty(d))
    if any(t.shape != g.shape or t.dtype != torch.float32 or not t.is_contiguous() or t.device != g.device
           for t in (stored, new_residual)):
        raise ValueError("compress_blocks: out must be two contiguous (d,) float32 tensors on g's device")
    code = library.compress_blocks(residual.data_ptr(), g.data_ptr(), d, layout.block, layout.starts.data_ptr(),
                                   blocks, 1 if dtype == torch.bfloat16 else 0, values.data_ptr(),
                                   offsets.data_ptr(), new_residual.data_ptr(), stored.data_ptr(),
                                   torch.get_num_threads())
    if code == 1:
        raise MemoryError("compress_blocks: the kernel could not allocate its per-thread buffers")
    problem = {0: None, 2: "gradient", 3: "sum"}[code]
    return problem, values, offsets, stored, new_residual


# The window's Cholesky factor --------------------------------------------------------------------------


def factor_shift(upper: torch.Tensor, column: torch.Tensor, diag: float, probe: torch.Tensor | None = None,
                 gram: torch.Tensor | None = None, gram_probe: torch.Tensor | None = None,
                 out: torch.Tensor | None = None):
    """The factor of a full window after its oldest gradient leaves and a new one arrives, in O(m^2).

    ``upper`` (m, m) float64 is U with K = U^T U, rows in age order (0 = oldest); the new K drops
    row and column 0 and appends ``column`` ((m - 1,) float64, age order) and ``diag`` at the end.
    Returns (U', product, gram_times): the new factor U' (``upper`` is not changed), written into
    ``out`` ((m, m) float64 of its own, zero below its diagonal: only the upper triangle is written)
    or a new tensor; for a ``probe`` z ((m,) float64, age order), U'^T U' z; and with ``gram`` (m, m)
    and ``gram_probe`` (m,), gram @ gram_probe, computed by a second thread meanwhile (else None).
    None where the kernel cannot run (no library, not on the CPU) or round-off made the new matrix
    look indefinite: the caller refactorises. Givens rotations for the drop (a rank-one update: no
    cancellation), a triangular solve and a square root for the append: 3 m^2 flops, 2 m^2 more for
    the probe, in one pass over the rows of U."""
    m = upper.shape[0]
    tensors = [t for t in (upper, column, probe, gram, gram_probe) if t is not None]
    if out is not None and (out.shape != (m, m) or out.dtype != torch.float64 or not out.is_contiguous()
                            or any(out.data_ptr() == t.data_ptr() for t in tensors)):
        raise ValueError("factor_shift: out must be a contiguous (m, m) float64 tensor of its own")
    usable = all(t.dtype == torch.float64 for t in tensors) and m >= 2 and (gram is None) == (gram_probe is None)
    if gram is not None and (gram.shape != (m, m) or gram_probe.shape != (m,)):
        usable = False
    tensors += [out] if out is not None else []
    library = _usable(*tensors) if usable else None
    if library is None:
        return None
    lower_zero = out is not None
    if out is None:
        out = torch.empty_like(upper)
    work = torch.empty(3 * m, dtype=torch.float64)
    product = None if probe is None else torch.empty(m, dtype=torch.float64)
    gram_times = None if gram is None else torch.empty(m, dtype=torch.float64)
    pointer = lambda t: None if t is None else t.data_ptr()
    if library.factor_shift(upper.data_ptr(), m, column.data_ptr(), float(diag), pointer(probe), out.data_ptr(),
                            int(lower_zero), work.data_ptr(), pointer(product), pointer(gram), pointer(gram_probe),
                            pointer(gram_times)):
        return None
    return out, product, gram_times


# Block-diagonal statistics and their factorisation ---------------------------------------------------


def _block_rows(blocks: torch.Tensor, starts: torch.Tensor | None, cover) -> tuple[int, torch.Tensor] | None:
    """(n, starts) for (count, n, n) blocks (``starts`` None) or (count, P) ones whose row i lies at
    ``starts[i]`` .. ``starts[i + 1]``; None for rows out of order, past P, or shorter than cover(i)."""
    if starts is None:
        if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
            return None
        n = blocks.shape[1]
        return n, torch.arange(n + 1, dtype=torch.int64) * n
    if (blocks.dim() != 2 or not isinstance(starts, torch.Tensor) or starts.dim() != 1 or len(starts) < 2
            or starts.dtype != torch.int64 or starts.device.type != "cpu"):
        return None
    n = len(starts) - 1
    starts = starts.contiguous()
    if int(starts[0]) < 0 or int(starts[-1]) > blocks.shape[1] or bool((starts.diff() < cover(torch.arange(n))).any()):
        return None
    return n, starts


def gram_update(stats: torch.Tensor, rows: torch.Tensor, start: int,
                starts: torch.Tensor | None = None) -> bool | None:
    """Add P_b^T P_b to the lower triangle of each block of ``stats``, where P_b = rows[:, start + b * B :
    start + (b + 1) * B] for ``rows`` (n, d) with unit column stride, in the same dtype (float32 or
    float64), on the CPU. ``stats``: contiguous (count, B, B) blocks, or (count, P) blocks whose row i
    lies at entries ``starts[i]`` .. ``starts[i + 1]`` ((B + 1,) int64) and holds at least the row's
    first i + 1 columns rounded up to 32 floats / 16 doubles (the packed lower triangle of
    :class:`mfac.fisher.block_factor.RowLayout`). Stored entries above the diagonal are left as they
    were, but for a few next to it, which receive their true values.

    Returns True when done; False when done but some entry of those columns of ``rows`` was NaN or
    Inf (``stats`` then holds non-finite values: discard it); None, nothing changed, where the
    compiled kernel cannot run (no library, not a CPU tensor, another dtype or layout, or B not a
    multiple of 32 floats / 16 doubles): the caller then uses a batched product. Cost: about n B^2
    flops per block (half a full product), reading ``rows`` once and each block's sums once."""
    if stats.dtype not in (torch.float32, torch.float64):
        return None
    width = 128 // stats.element_size()
    layout = _block_rows(stats, starts, lambda i: (i // width + 1) * width)
    if layout is None:
        return None
    size, starts = layout
    count = stats.shape[0]
    if rows.dim() != 2 or rows.dtype != stats.dtype or rows.stride(1) != 1 or rows.shape[1] < start + count * size:
        return None
    if size % width or not stats.is_contiguous():
        return None
    library = _usable(stats) if rows.device.type == "cpu" else None
    if library is None:
        return None
    function = library.gram_update_f32 if stats.dtype == torch.float32 else library.gram_update_f64
    pointer = rows.data_ptr() + start * rows.element_size()
    code = function(stats.data_ptr(), count, size, stats[0].numel() if count else 0, starts.data_ptr(), pointer,
                    rows.shape[0], rows.stride(0), torch.get_num_threads())
    if code not in (0, 3):
        raise RuntimeError(f"gram_update: unexpected return code {code}")
    return code == 0


# Largest block the compiled factorisation takes: a thread works on one block at a time in two
# copies (2 n^2 numbers: 1 MiB in float64 at 256), which must stay in the core's cache; larger
# matrices are few and LAPACK's blocked, multi-threaded factorisation serves them well.
INVERSE_FACTORS_MAX_SIZE = 256
_PANEL = 8  # rows factorised together (PANEL in window.c): a row is read up to its panel's end


def inverse_factors(blocks: torch.Tensor, probe: torch.Tensor, limit: float = math.inf,
                    starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Factorise each symmetric block of ``blocks`` (float32 or float64, contiguous, CPU, n <=
    INVERSE_FACTORS_MAX_SIZE; lower triangle read), in the blocks' dtype: X = L^-1 where block =
    L L^T, and the residual |X A X^T z - z| for the unit ``probe`` z ((n,) float64), computed in
    float64 (about eps * cond(A)). ``blocks``: (count, n, n), or (count, P) with row i of each block
    at entries ``starts[i]`` .. ``starts[i + 1]`` ((n + 1,) int64), holding at least the row's first
    min(n, i rounded up to a multiple of 8) columns. Each block is overwritten with X (lower
    triangular, every stored entry above the diagonal zero) where its residual is at most ``limit``,
    and left exactly as it was otherwise.

    Returns (info, residual): info (count,) int32, 0 where the factorisation ran to the end, i + 1
    where the i-th pivot was not positive (residual inf); residual (count,) float64. Returns None,
    with nothing changed, where the compiled kernel cannot run (no library, not a CPU tensor,
    another dtype, size or layout). Cost: 2 n^3 / 3 + 3 n^2 flops per block, in panels of
    register-blocked products (BENCHMARKS.md#streamed-block-statistics)."""
    if blocks.dtype not in (torch.float32, torch.float64):
        return None
    layout = _block_rows(blocks, starts, lambda i: torch.clamp((i // _PANEL + 1) * _PANEL, max=len(i)))
    if layout is None:
        return None
    size, starts = layout
    count = blocks.shape[0]
    if not 1 <= size <= INVERSE_FACTORS_MAX_SIZE or probe.shape != (size,) or probe.dtype != torch.float64:
        return None
    library = _usable(blocks, probe)
    if library is None:
        return None
    info = torch.zeros(count, dtype=torch.int32)
    residual = torch.empty(count, dtype=torch.float64)
    function = library.inverse_factors_f32 if blocks.dtype == torch.float32 else library.inverse_factors_f64
    _call(function, blocks.data_ptr(), count, size, blocks[0].numel() if count else 0, starts.data_ptr(),
          probe.data_ptr(), float(limit), info.data_ptr(), residual.data_ptr())
    return info, residual
