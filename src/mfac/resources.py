"""Memory checks made before large allocations: refuse up front, with the numbers, what cannot fit.

An allocation that the operating system lets through (Linux over-commits) is only really filled
later, and a process that then crosses the machine's memory is ended by the out-of-memory killer
without a message. So every large state in mfac (a window, a gradient matrix, block factors)
estimates its bytes and calls :func:`check_fits` first.
"""

from __future__ import annotations

import os

import torch

__all__ = ["InsufficientMemoryError", "available_bytes", "check_fits"]


class InsufficientMemoryError(MemoryError):
    """A request that cannot fit in the memory available; nothing was allocated."""


def _format(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(nbytes) < 1024 or unit == "PB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} PB"  # pragma: no cover


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Bytes that can still be allocated on ``device``: free device memory on CUDA (plus what
    torch's caching allocator holds unused), MemAvailable on Linux CPUs; None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX systems
        return None


def check_fits(nbytes: int, device: torch.device | str, what: str, fix: str) -> None:
    """Raise :class:`InsufficientMemoryError` if ``nbytes`` (the estimate for ``what``) exceeds the
    memory available on ``device``; the message gives both numbers and ``fix`` (which argument to
    lower). Does nothing when the available memory cannot be determined."""
    available = available_bytes(device)
    if available is not None and nbytes > available:
        raise InsufficientMemoryError(
            f"{what} needs {_format(nbytes)} but only {_format(available)} is available on {torch.device(device)}; "
            f"{fix}")
