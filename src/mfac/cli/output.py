"""The output folder ``--out``: checked before any work, and written all at once at the end."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import CliError

__all__ = ["default_out", "check_out", "staged_output"]


def default_out(command: str) -> Path:
    """A new folder ``./mfac-runs/COMMAND-YYYYmmdd-HHMMSS`` (with ``-2``, ``-3``, ... if taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("mfac-runs") / f"{command}-{stamp}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def check_out(out: str | None, command: str, force: bool) -> Path:
    """The output folder, checked before any work: not a file, not inside a file, writable, and
    empty unless ``force``. Nothing is created."""
    path = Path(out) if out else default_out(command)
    if path.exists() and not path.is_dir():
        raise CliError(f"--out {path} is a file, not a folder; choose another --out")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise CliError(f"--out {path} already exists and is not empty; choose a new folder, or pass --force to "
                       f"write into it")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise CliError(f"--out {path} cannot be created: {existing} is a file")
    try:  # the only reliable test of writability (permissions, read-only mounts, root or not)
        probe = tempfile.mkdtemp(prefix=".mfac-write-test-", dir=existing)
        os.rmdir(probe)
    except OSError as error:
        raise CliError(f"--out {path} cannot be written ({error.strerror or error}); choose another --out") from None
    return path


@contextmanager
def staged_output(out: Path):
    """Yield a temporary folder beside ``out``; on success move its files into ``out`` (each by an
    atomic rename, ``report.json`` last); on any failure or Ctrl-C remove it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        out.mkdir(parents=True, exist_ok=True)
        for item in sorted(staging.iterdir(), key=lambda p: p.name == "report.json"):
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
