"""Compiled CPU kernels for the window products, with pure-torch fallbacks.

This module owns one small C file (``window.c``: products with a bfloat16 window, and with a
compressed window of (value, int16 offset) pairs) and the bridge to it. torch has no fast product
of a bfloat16 matrix with a float32 vector that accumulates in float32 (its own bfloat16 product
rounds the vector and the result to bfloat16), and its sparse formats are far from memory speed
(see BENCHMARKS.md), so these few loops are written in C, blocked over columns so the window is
read exactly once per product.

The library is built on first use, not at import, with the system C compiler (``$CC``, default
``cc``; flags ``-O3 -march=native -fopenmp``), into ``$MFAC_KERNEL_CACHE`` (default
``~/.cache/mfac/kernels``), keyed by a hash of the source, flags and platform, so a later process
loads it in milliseconds. Where no compiler is found, the build fails, the data is not on the CPU,
or ``MFAC_KERNELS=0`` is set, every product falls back to torch: the same results up to float32
rounding, only slower. :func:`status` says which is in use and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["available", "status", "dense_dots", "dense_combine", "sparse_dots", "sparse_combine"]

_SOURCE = Path(__file__).with_name("window.c")
_FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3"])
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
}


def _cache_dir() -> Path:
    root = os.environ.get("MFAC_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "mfac" / "kernels"


def _build() -> ctypes.CDLL:
    """Compile window.c (trying flag sets from fastest to most portable) and load it."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler: {compiler!r} is not on PATH (set CC to one)")
    source = _SOURCE.read_bytes()
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(source + " ".join([compiler, *flags, platform.machine(), platform.node(),
                                                 sys.platform]).encode()).hexdigest()[:16]
        target = _cache_dir() / f"mfac_window_{key}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            # Build under a private name, then rename: processes starting together never load half a file.
            handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(handle)
            done = subprocess.run([compiler, *flags, "-shared", "-fPIC", str(_SOURCE), "-o", partial],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                os.unlink(partial)
                errors.append(f"{' '.join(flags)}: {done.stderr.strip()[-300:]}")
                continue
            os.replace(partial, target)
        library = ctypes.CDLL(str(target))
        for name, argtypes in _SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes, function.restype = argtypes, ctypes.c_int
        return library
    raise RuntimeError("the C compiler failed: " + " | ".join(errors))


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
                    _library = _build()
                    _reason = "compiled kernels in use"
                except (OSError, RuntimeError) as error:
                    _reason = f"torch fallback: {error}"
            _tried = True
    return _library


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
    within blocks of 8192 coordinates. One read of rows; O(k d)."""
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


def _value_kind(values: torch.Tensor) -> int:
    return {torch.float32: 0, torch.bfloat16: 1}[values.dtype]


def _absolute(offsets: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    return offsets.long() + bases


def sparse_dots(values: torch.Tensor, offsets: torch.Tensor, starts: torch.Tensor, bases: torch.Tensor, block: int,
                x: torch.Tensor) -> torch.Tensor:
    """G x in float64 for compressed rows G (k of them) and x (d,) float32.

    ``values`` (k, nnz) float32 or bfloat16 and ``offsets`` (k, nnz) int16 hold each row's entries;
    entries ``starts[b]:starts[b+1]`` (int64, blocks + 1) lie in block b of ``block`` coordinates,
    at ``bases[e] + offsets[:, e]`` (``bases``: (nnz,) int64, block b's first coordinate). One read
    of the rows (k nnz (2 + value bytes) bytes); O(k nnz)."""
    out = torch.empty(values.shape[0], dtype=torch.float64, device=values.device)
    library = _usable(values, offsets, starts, x) if x.dtype == torch.float32 else None
    if library is None or values.shape[0] == 0:
        for start in range(0, values.shape[0], 64):
            index = _absolute(offsets[start:start + 64], bases)
            out[start:start + 64] = (values[start:start + 64].float() * x.float()[index]).sum(1).double()
        return out
    _call(library.sparse_dots, values.data_ptr(), _value_kind(values), offsets.data_ptr(), values.shape[0],
          values.shape[1], starts.data_ptr(), starts.numel() - 1, block, x.data_ptr(), out.data_ptr())
    return out


def sparse_combine(values: torch.Tensor, offsets: torch.Tensor, starts: torch.Tensor, bases: torch.Tensor, block: int,
                   coeffs: torch.Tensor, x: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """beta * x + alpha * G^T coeffs in float32 for compressed rows G (as in :func:`sparse_dots`),
    coeffs (k,) and x (d,). One read of the rows; O(k nnz + d)."""
    coeffs = coeffs.to(torch.float32).contiguous()
    library = _usable(values, offsets, starts, x) if x.dtype == torch.float32 else None
    if library is None:
        out = x.float() * beta
        for start in range(0, values.shape[0], 64):
            index = _absolute(offsets[start:start + 64], bases)
            weighted = values[start:start + 64].float() * coeffs[start:start + 64, None]
            out.index_add_(0, index.reshape(-1), weighted.reshape(-1), alpha=alpha)
        return out
    out = torch.empty_like(x)
    _call(library.sparse_combine, values.data_ptr(), _value_kind(values), offsets.data_ptr(), values.shape[0],
          values.shape[1], starts.data_ptr(), starts.numel() - 1, block, x.shape[0], coeffs.data_ptr(),
          x.data_ptr(), beta, alpha, out.data_ptr())
    return out
