"""Saving and loading files safely: atomic writes, no code execution on load, safetensors weights.

* :func:`save` writes any state (an optimizer's, a pruner's, a training loop's) with ``torch.save``
  so that a kill at any moment leaves either the old file or the new one, never a torn one: it
  writes a temporary file in the same folder, flushes it to disk (fsync), renames it over the
  target and syncs the folder.
* :func:`load` reads such a file with ``weights_only=True``: tensors, numbers, strings and plain
  containers only. A file that asks to run code (a malicious pickle) is refused with
  :class:`UnsafeFileError` and nothing in it runs.
* :func:`save_weights` / :func:`load_weights` handle a flat name -> tensor dict (a model's
  ``state_dict``). Writing uses safetensors (readable by any tool, no pickle at all; needs the
  ``safetensors`` package, in ``mfac-torch[cli]``); reading accepts safetensors or a torch file.

Use in a training loop (resumes bit for bit after a kill)::

    from mfac import checkpoint
    checkpoint.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, "run.pt")
    state = checkpoint.load("run.pt")
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path

import torch

__all__ = ["save", "load", "save_weights", "load_weights", "atomic_write_bytes", "safetensors_torch", "read_safetensors", "UnsafeFileError",
           "CorruptFileError"]


class UnsafeFileError(ValueError):
    """The file holds Python objects whose loading could run code; it was refused and nothing ran."""


class CorruptFileError(ValueError):
    """The file is not a readable checkpoint (empty, truncated, text, or another format)."""


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: str | Path, write) -> Path:
    """Call ``write(file_object)`` on a temporary file beside ``path``, fsync it, rename it over
    ``path`` and fsync the folder. On any error (Ctrl-C included) the temporary file is removed and
    ``path`` is untouched. The file gets the mode a plain ``open`` would give it (0644 under the
    usual umask 022), not the private mode of a temporary file."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(folder)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`save`): a kill leaves the old file or the new."""
    return _atomic_write(path, lambda handle: handle.write(data))


def save(obj, path: str | Path) -> Path:
    """``torch.save(obj, path)``, atomically: a kill leaves the previous file or the complete new
    one. ``obj`` should hold only tensors, numbers, strings, None and lists/tuples/dicts of them, so
    that :func:`load` can read it back without unpickling code. Cost: one write plus an fsync."""
    return _atomic_write(path, lambda handle: torch.save(obj, handle))


def load(path: str | Path, map_location="cpu"):
    """Read a file written by :func:`save` (or any ``torch.save`` of plain data) without running
    code. Raises FileNotFoundError, :class:`UnsafeFileError` for a file that holds other Python
    objects, or :class:`CorruptFileError` for one that is not a torch file at all."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a checkpoint file; pass the file inside it (such as "
                                f"{path / 'checkpoint.pt'})")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)|Unsupported global: GLOBAL (\S+)", str(error))
        if found:
            raise UnsafeFileError(
                f"{path} was refused: it asks to load the Python object {found[1] or found[2]}, and loading objects "
                f"other than tensors and plain data could run code. Load only files you trust, or re-save the "
                f"weights as a state dict (or safetensors)"
            ) from None
        raise CorruptFileError(f"{path} is not a readable torch file: its contents are not a valid checkpoint "
                               f"(damaged, or another format)") from None
    except (EOFError, KeyError, RuntimeError, zipfile.BadZipFile, ValueError, IndexError, UnicodeDecodeError,
            OSError) as error:
        if isinstance(error, (PermissionError, FileNotFoundError)):
            raise
        raise CorruptFileError(f"{path} is not a readable torch file: it is empty, truncated or in another "
                               f"format") from None


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    header_bytes = int.from_bytes(head[:8], "little")
    return 0 < header_bytes < (1 << 30) and head[8:9] == b"{"


def safetensors_torch():
    try:
        import safetensors.torch
    except ImportError as error:
        raise ImportError("reading and writing .safetensors files needs the safetensors package: "
                          "pip install safetensors (or pip install 'mfac-torch[cli]')") from error
    return safetensors.torch


def read_safetensors(path: str | Path, tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(the metadata, and with ``tensors`` every tensor) of a safetensors file, read without running
    code. Raises FileNotFoundError, or :class:`CorruptFileError` for a file safetensors cannot read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    safetensors_torch()  # a clear ImportError when the package is missing
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            entries = {key: handle.get_tensor(key) for key in handle.keys()} if tensors else {}
    except Exception as error:  # safetensors raises its own error types for malformed files
        raise CorruptFileError(f"{path} is not a readable safetensors file ({' '.join(str(error).split())[:120]})"
                               ) from None
    return metadata, entries


def save_weights(weights: dict, path: str | Path) -> Path:
    """Write a name -> tensor dict (e.g. ``model.state_dict()``) as safetensors, atomically.
    Tensors are made contiguous and copied to the CPU; shared storage is written once per name."""
    bad = [name for name, value in weights.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise TypeError(f"save_weights takes a dict of tensors; these entries are not tensors: {bad[:5]}")
    plain = {name: value.detach().to("cpu").contiguous().clone() for name, value in weights.items()}
    data = safetensors_torch().save(plain)
    return _atomic_write(path, lambda handle: handle.write(data))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a name -> tensor dict from a safetensors file or a torch file (a state dict, or a dict
    holding one under ``state_dict`` or ``model``), never running code. Raises FileNotFoundError,
    :class:`UnsafeFileError` or :class:`CorruptFileError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if _is_safetensors(path):
        try:
            return dict(safetensors_torch().load_file(str(path)))
        except ImportError:
            raise
        except Exception as error:  # safetensors raises its own error types for malformed files
            raise CorruptFileError(f"{path} is not a readable safetensors file ({' '.join(str(error).split())[:120]})"
                                   ) from None
    raw = load(path)
    if isinstance(raw, dict) and isinstance(raw.get("state_dict", raw.get("model")), dict):
        raw = raw.get("state_dict", raw.get("model"))
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CorruptFileError(f"{path} holds a {type(raw).__name__}, not a state dict of tensors")
    return raw
