"""Building and loading the compiled window kernels, trusting nothing this user did not build.

A shared library runs its constructors in the process that loads it, so a library is loaded only
when every one of these holds:

* the cache folder (``$MFAC_KERNEL_CACHE``, default ``~/.cache/mfac/kernels``) is a directory owned
  by this user and writable by no one else. Otherwise nothing in it is read and nothing is written
  there: the library is built in a fresh private temporary folder (mode 0700), loaded, and deleted;
* the library and its sidecar (``<name>.sha256``, written at build time: the cache key and the
  library's SHA-256) are regular files, not symbolic links, owned by this user and writable by no
  one else, and the sidecar names this cache key;
* the SHA-256 of the bytes read matches the sidecar; the file loaded is the file checked (the same
  inode, in a folder no one else can write).

A cached library that fails a check is rebuilt (and replaces it); one that cannot be loaded or lacks
a kernel symbol is reported, and the caller falls back to torch. The compiler (``$CC``, split as a
shell would: ``"gcc -pipe"`` works) runs with a timeout (``$MFAC_KERNEL_BUILD_TIMEOUT`` seconds,
default 120) in its own process group, all of it killed on timeout, inside a private temporary
folder that is removed whatever happens; folders left by a build that was killed are removed by
the next build once they are an hour old.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["BuildError", "SOURCE", "FLAG_SETS", "DEFAULT_TIMEOUT", "STALE_SECONDS", "cache_folder",
           "compiler_command", "build_timeout", "load_library"]

SOURCE = Path(__file__).with_name("window.c")
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3"])
DEFAULT_TIMEOUT = 120.0
STALE_SECONDS = 3600  # a partial build this old belongs to a process that was killed
SIDECAR_FORMAT = "mfac-kernel-1"
BUILD_PREFIX = ".build-"


class BuildError(RuntimeError):
    """The kernels cannot be built or loaded; the message says why (shown by ``kernels.status()``)."""


def cache_folder() -> Path:
    root = os.environ.get("MFAC_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "mfac" / "kernels"


def compiler_command() -> list[str]:
    """``$CC`` (default ``cc``) split into words as a shell would, the program found on PATH."""
    text = os.environ.get("CC", "cc")
    try:
        words = shlex.split(text)
    except ValueError as error:
        raise BuildError(f"CC={text!r} cannot be split into words ({error}); quote it as a shell would") from None
    if not words or shutil.which(words[0]) is None:
        raise BuildError(f"no C compiler: {text!r} is not on PATH (set CC to one)")
    return words


def build_timeout() -> float:
    text = os.environ.get("MFAC_KERNEL_BUILD_TIMEOUT")
    if text is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise BuildError(f"MFAC_KERNEL_BUILD_TIMEOUT={text!r} must be a number of seconds > 0")
    return value


def private_problem(info: os.stat_result, what: str) -> str | None:
    """Why a file or folder with this stat cannot be trusted (None: owned by this user, writable by no one else)."""
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return f"{what} is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} is writable by other users (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def open_folder(folder: Path) -> tuple[int | None, str | None]:
    """(descriptor of the cache folder, None) when it can be trusted, creating it (0700) if missing;
    else (None, why)."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        handle = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as error:
        return None, f"the kernel cache {folder} cannot be used ({error.strerror or error})"
    problem = private_problem(os.fstat(handle), f"the kernel cache {folder}")
    if problem is not None:
        os.close(handle)
        return None, problem
    return handle, None


def read_private(folder_fd: int, name: str) -> tuple[int, bytes] | None:
    """(open descriptor, contents) of ``name`` in the folder if it is a regular file (not a link)
    owned by this user and writable by no one else; None otherwise. The caller closes the descriptor."""
    try:
        handle = os.open(name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0), dir_fd=folder_fd)
    except OSError:
        return None
    info = os.fstat(handle)
    if not stat.S_ISREG(info.st_mode) or private_problem(info, name) is not None:
        os.close(handle)
        return None
    with os.fdopen(os.dup(handle), "rb") as stream:
        return handle, stream.read()


def open_library(handle: int, path: Path) -> ctypes.CDLL:
    """Load the library checked through ``handle`` from its path (in a folder only this user can
    write), then make sure the path still names the file that was checked."""
    checked = os.fstat(handle)
    library = ctypes.CDLL(str(path))
    now = os.stat(path, follow_symlinks=False)
    if (now.st_dev, now.st_ino) != (checked.st_dev, checked.st_ino):
        raise BuildError(f"{path} was replaced while it was being loaded; not using it")
    return library


def sidecar_text(key: str, digest: str) -> str:
    return f"{SIDECAR_FORMAT} {key} {digest}\n"


def load_cached(folder_fd: int, folder: Path, key: str) -> ctypes.CDLL | None:
    """The cached library of this key, if it and its sidecar pass every check; None (rebuild) otherwise."""
    name = f"mfac_window_{key}.so"
    sidecar = read_private(folder_fd, f"{name}.sha256")
    if sidecar is None:
        return None
    os.close(sidecar[0])
    library = read_private(folder_fd, name)
    if library is None:
        return None
    handle, data = library
    try:
        if sidecar[1].decode("ascii", "replace") != sidecar_text(key, hashlib.sha256(data).hexdigest()):
            return None
        return open_library(handle, folder / name)
    except OSError:  # ours and intact, but not loadable here (say, after a system upgrade): rebuild it
        return None
    finally:
        os.close(handle)


def remove_stale(folder: Path) -> None:
    """Remove partial builds (ours, over an hour old) that a killed process left in the cache."""
    now = time.time()
    for entry in folder.iterdir():
        if not (entry.name.startswith(BUILD_PREFIX) or (entry.name.startswith("tmp") and entry.suffix == ".so")):
            continue
        try:
            info = entry.lstat()
            if now - info.st_mtime > STALE_SECONDS and private_problem(info, entry.name) is None:
                shutil.rmtree(entry) if stat.S_ISDIR(info.st_mode) else entry.unlink()
        except OSError:
            pass


def run_compiler(command: list[str], output: Path, log: Path, timeout: float) -> str | None:
    """Compile window.c to ``output``; the compiler's error text on failure, None on success. Raises
    BuildError when it does not finish in ``timeout`` seconds (after killing its whole process group)."""
    with open(log, "wb") as errors:
        process = subprocess.Popen([*command, "-shared", "-fPIC", str(SOURCE), "-o", str(output), "-lm"],
                                   stdin=subprocess.DEVNULL, stdout=errors, stderr=errors,
                                   start_new_session=hasattr(os, "killpg"))
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if hasattr(os, "killpg"):
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except OSError:
                    pass
            process.kill()
            process.wait()
            raise BuildError(f"the C compiler ({shlex.join(command[:1])}) did not finish within {timeout:g} s "
                             f"(MFAC_KERNEL_BUILD_TIMEOUT) and was stopped") from None
    if code != 0 or not output.exists():
        return log.read_text(errors="replace").strip()[-300:] or f"exit status {code}"
    return None


def build_into(workdir: Path, command: list[str], flags: list[str], timeout: float):
    """Compile into ``workdir`` and load the result: (library, SHA-256, path), or (None, error text, None)."""
    output = workdir / "library.so"
    error = run_compiler([*command, *flags], output, workdir / "compiler.log", timeout)
    if error is not None:
        return None, error, None
    os.chmod(output, 0o755)
    handle = os.open(output, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        with os.fdopen(os.dup(handle), "rb") as stream:
            digest = hashlib.sha256(stream.read()).hexdigest()
        return open_library(handle, output), digest, output
    finally:
        os.close(handle)


def publish(folder: Path, workdir: Path, built: Path, key: str, digest: str) -> None:
    """Move a library just built into the cache, its sidecar after it (a reader that sees the new
    library with the old sidecar finds the hashes differ and rebuilds)."""
    name = f"mfac_window_{key}.so"
    sidecar = workdir / "sidecar"
    sidecar.write_text(sidecar_text(key, digest))
    os.chmod(sidecar, 0o644)
    os.replace(built, folder / name)
    os.replace(sidecar, folder / f"{name}.sha256")


def cache_key(command: list[str], flags: list[str]) -> str:
    words = " ".join([*command, *flags, platform.machine(), platform.node(), sys.platform])
    return hashlib.sha256(SOURCE.read_bytes() + words.encode()).hexdigest()[:16]


def load_library() -> tuple[ctypes.CDLL, str]:
    """The kernel library and a note on where it came from: from the cache when a trusted copy is
    there, else built (flag sets from fastest to most portable). Raises BuildError (or OSError)."""
    command = compiler_command()
    timeout = build_timeout()
    folder = cache_folder()
    folder_fd, problem = open_folder(folder)
    errors = []
    try:
        for flags in FLAG_SETS:
            key = cache_key(command, flags)
            if folder_fd is not None:
                library = load_cached(folder_fd, folder, key)
                if library is not None:
                    return library, f"loaded from {folder}"
                remove_stale(folder)
            workdir = Path(tempfile.mkdtemp(prefix=BUILD_PREFIX, dir=folder if folder_fd is not None else None))
            try:
                library, result, built = build_into(workdir, command, flags, timeout)
                if library is None:
                    errors.append(f"{' '.join(flags)}: {result}")
                    continue
                if folder_fd is None:
                    return library, f"built in a private temporary folder, not cached: {problem}"
                try:
                    publish(folder, workdir, built, key, result)
                except OSError as error:
                    return library, f"built, but not cached in {folder} ({error.strerror or error})"
                return library, f"built into {folder}"
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
    finally:
        if folder_fd is not None:
            os.close(folder_fd)
    raise BuildError("the C compiler failed: " + " | ".join(errors))
