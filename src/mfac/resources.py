"""Memory checks made before large allocations: refuse up front, with the numbers, what cannot fit.

An allocation that the operating system lets through (Linux over-commits) is only really filled
later, and a process that then crosses the machine's memory is ended by the out-of-memory killer
without a message. So every large state in mfac (a window, a gradient matrix, block factors)
estimates its bytes and calls :func:`check_fits` first. On a CPU the memory available is the
smallest of the machine's ``MemAvailable``, the room left under the process's address-space limit
(``RLIMIT_AS``, ``ulimit -v``) and under its cgroup's memory limit (a container's, v1 or v2).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["InsufficientMemoryError", "available_bytes", "check_fits", "memory_limits", "meminfo_available",
           "address_space_available", "cgroup_available"]

UNLIMITED = 1 << 62  # cgroup v1 writes "no limit" as about 2^63 (rounded to a page)


class InsufficientMemoryError(MemoryError):
    """A request that cannot fit in the memory available; nothing was allocated."""


def _format(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(nbytes) < 1024 or unit == "PB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} PB"  # pragma: no cover


def read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def meminfo_available(root: str | Path = "/") -> int | None:
    """MemAvailable from ``/proc/meminfo``: what the machine can still give without swapping."""
    text = read_text(Path(root, "proc", "meminfo")) or ""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def address_space_available(root: str | Path = "/") -> int | None:
    """RLIMIT_AS (``ulimit -v``) minus this process's virtual size (VmSize in ``/proc/self/status``):
    what an allocation may still map before it fails; None without a limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    for line in (read_text(Path(root, "proc", "self", "status")) or "").splitlines():
        if line.startswith("VmSize:"):
            return soft - int(line.split()[1]) * 1024
    return soft


def _number(text: str | None) -> int | None:
    """A cgroup memory value; None for "max", a v1 "unlimited" (about 2^63), or nothing readable."""
    if text is None or not text.strip().isdigit():
        return None
    value = int(text.strip())
    return None if value >= UNLIMITED else value


def _reclaimable(stat_text: str | None, keys: tuple[str, ...]) -> int:
    """Inactive page cache in a cgroup's memory.stat: counted in its usage, but given back on demand."""
    fields = dict(line.split()[:2] for line in (stat_text or "").splitlines() if len(line.split()) >= 2)
    for key in keys:
        if fields.get(key, "").isdigit():
            return int(fields[key])
    return 0


def cgroup_available(root: str | Path = "/") -> int | None:
    """The smallest room left under the memory limits of this process's cgroup and its ancestors:
    limit minus usage (less the inactive page cache, which the kernel reclaims before it would kill).
    cgroup v2: ``memory.max`` and ``memory.current``; v1: ``memory.limit_in_bytes`` and
    ``memory.usage_in_bytes`` of the memory controller. Paths come from ``/proc/self/cgroup``, under
    ``<root>/sys/fs/cgroup``; None when no limit is set or nothing can be read."""
    base = Path(root, "sys", "fs", "cgroup")
    places = []  # (hierarchy folder, path in it, limit file, usage file, reclaimable keys in memory.stat)
    for line in (read_text(Path(root, "proc", "self", "cgroup")) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        ident, controllers, path = parts
        if ident == "0" and controllers == "":
            for folder in (base, base / "unified"):
                places.append((folder, path, "memory.max", "memory.current", ("inactive_file",)))
        elif "memory" in controllers.split(","):
            places.append((base / "memory", path, "memory.limit_in_bytes", "memory.usage_in_bytes",
                           ("total_inactive_file", "inactive_file")))
    found = []
    for folder, path, limit_name, usage_name, keys in places:
        parts = [part for part in path.strip().split("/") if part]
        for depth in range(len(parts), -1, -1):  # the process's cgroup, then each ancestor up to the root
            here = folder.joinpath(*parts[:depth])
            limit = _number(read_text(here / limit_name))
            usage = _number(read_text(here / usage_name))
            if limit is not None and usage is not None:
                found.append(limit - max(0, usage - _reclaimable(read_text(here / "memory.stat"), keys)))
    return min(found) if found else None


def memory_limits(device: torch.device | str = "cpu", root: str | Path = "/") -> dict[str, int]:
    """Every known bound on what can still be allocated on ``device``, by name: on CUDA the free
    device memory (plus what torch's caching allocator holds unused); on a CPU ``MemAvailable``, the
    room under ``RLIMIT_AS`` and under the cgroup memory limit, those that apply. Empty when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return {"free device memory": int(free + cached)}
    if device.type != "cpu":
        return {}
    bounds = {"MemAvailable": meminfo_available(root), "RLIMIT_AS (ulimit -v)": address_space_available(root),
              "the cgroup memory limit": cgroup_available(root)}
    if bounds["MemAvailable"] is None:
        try:
            bounds["MemAvailable"] = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX systems
            pass
    return {name: max(0, value) for name, value in bounds.items() if value is not None}


def available_bytes(device: torch.device | str = "cpu", root: str | Path = "/") -> int | None:
    """Bytes that can still be allocated on ``device``: the smallest of :func:`memory_limits` (on a
    CPU: MemAvailable, RLIMIT_AS less the virtual size, the cgroup limit less its usage); None when
    unknown. ``root`` is where ``/proc`` and ``/sys`` are read (for tests)."""
    bounds = memory_limits(device, root)
    return min(bounds.values()) if bounds else None


def check_fits(nbytes: int, device: torch.device | str, what: str, fix: str) -> None:
    """Raise :class:`InsufficientMemoryError` if ``nbytes`` (the estimate for ``what``) exceeds the
    memory available on ``device``; the message gives both numbers and ``fix`` (which argument to
    lower). Does nothing when the available memory cannot be determined."""
    available = available_bytes(device)
    if available is not None and nbytes > available:
        bound = [name for name, value in memory_limits(device).items() if value == available]
        source = f" (the smallest bound: {bound[0]})" if bound else ""
        raise InsufficientMemoryError(
            f"{what} needs {_format(nbytes)} but only {_format(available)} is available on {torch.device(device)}"
            f"{source}; {fix}")
