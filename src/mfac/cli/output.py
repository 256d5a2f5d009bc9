"""The output folder ``--out``: checked before any work, and written all at once at the end.

Finished work is never thrown away. ``--out`` is resolved first (a symbolic link to a folder on
another disk, a Docker volume or ``/dev/shm`` is followed; a dangling link, a link loop, a file or a
folder that cannot be written is a usage error before any work). The results are written into a
staging folder on the same file system as their destination: inside ``--out`` itself when it
exists, else beside it in its parent, from where one rename puts the whole folder in place. If that
last move still fails, the staging folder is kept and the error says where the results are."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import CliError, RunError

__all__ = ["default_out", "check_out", "destination", "staged_output", "publish", "STAGING_PREFIX"]

STAGING_PREFIX = ".mfac-partial-"


def default_out(command: str) -> Path:
    """A new folder ``./mfac-runs/COMMAND-YYYYmmdd-HHMMSS`` (with ``-2``, ``-3``, ... if taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("mfac-runs") / f"{command}-{stamp}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def destination(out: Path) -> Path:
    """Where ``--out`` really is: symbolic links followed (the path itself, or any folder above it).
    A dangling link or a loop is a usage error."""
    path = Path(out)
    for link in (path, *path.parents):
        if not link.is_symlink():
            continue
        try:
            os.stat(link)
        except FileNotFoundError:
            target = os.readlink(link)
            where = "" if link == path else f" (in --out {path})"
            raise CliError(f"--out: {link}{where} is a symbolic link to {target}, which does not exist; create "
                           f"{target} first, or choose another --out") from None
        except OSError as error:  # a loop of links, a link through a file
            raise CliError(f"--out {path} cannot be used: {link} is a symbolic link that does not lead to a folder "
                           f"({error.strerror}); choose another --out") from None
    try:
        return Path(os.path.abspath(path)).resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop (Python < 3.13)
        raise CliError(f"--out {path} cannot be used ({' '.join(str(error).split())}); choose another --out") from None


def _existing_ancestor(path: Path) -> Path:
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    return existing


def check_out(out: str | None, command: str, force: bool) -> Path:
    """The output folder, checked before any work: not a dangling link, not a file, not inside a
    file, writable where the results will be staged, and empty unless ``force``. Nothing is created."""
    path = Path(out) if out else default_out(command)
    real = destination(path)
    if real.exists() and not real.is_dir():
        raise CliError(f"--out {path} is a file, not a folder; choose another --out")
    if real.is_dir() and any(real.iterdir()) and not force:
        raise CliError(f"--out {path} already exists and is not empty; choose a new folder, or pass --force to "
                       f"write into it")
    existing = _existing_ancestor(real)
    if existing.exists() and not existing.is_dir():
        raise CliError(f"--out {path} cannot be created: {existing} is a file")
    try:  # the only reliable test of writability (permissions, read-only mounts, root or not)
        probe = tempfile.mkdtemp(prefix=".mfac-write-test-", dir=existing)
        os.rmdir(probe)
    except OSError as error:
        raise CliError(f"--out {path} cannot be written ({error.strerror or error}); choose another --out") from None
    return path


def publish(staging: Path, dest: Path) -> None:
    """Put the staged results in place: the staging folder renamed to ``dest`` when ``dest`` does
    not exist, else each of its entries renamed into ``dest`` (``report.json`` last). Every rename
    stays on one file system (see :func:`staged_output`)."""
    if staging.parent == dest.parent and not dest.exists():
        os.rename(staging, dest)
        return
    for item in sorted(staging.iterdir(), key=lambda p: p.name == "report.json"):
        os.replace(item, dest / item.name)
    staging.rmdir()


@contextmanager
def staged_output(out: Path):
    """Yield a staging folder on the file system of ``out`` (inside it when it exists, else beside
    it); on success put its files into ``out`` (:func:`publish`). On a failure or Ctrl-C before the
    results are complete, remove it; if the results are complete but cannot be put in place, keep it
    and raise :class:`RunError` saying where they are."""
    dest = destination(out)
    if dest.is_dir():
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=dest))
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}{STAGING_PREFIX}", dir=dest.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        publish(staging, dest)
    except OSError as error:
        raise RunError(f"the results are complete but could not be moved into --out {out} "
                       f"({error.strerror or error}); they are kept in {staging}: move them from there") from None


def load_run_checkpoint(args, folder: Path, name: str, command: str) -> dict:
    """The checkpoint ``name`` of the earlier run of ``command`` (e.g. "mfac train") in ``folder``,
    read without running code. A missing checkpoint, an ``--out`` other than the run's own folder,
    or an unreadable file is a usage error that says why; the caller checks what kind of run it is."""
    import json

    from .. import checkpoint
    from .errors import CliError, usage_errors

    path = folder / name
    if not path.is_file():
        why = (f"; it must be the --out folder of an earlier `{command}` run (a run with --checkpoint-every 0 "
               f"keeps none)")
        try:
            if json.loads((folder / "report.json").read_text())["settings"]["checkpoint_every"] == 0:
                why = ": that run had --checkpoint-every 0 and kept no checkpoint, so there is nothing to resume"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        raise CliError(f"--resume {folder}: no {name} there{why}")
    if args.out is not None and Path(args.out).resolve() != folder.resolve():
        raise CliError(f"--resume writes into the run's own folder {folder}; leave out --out (or give the same folder)")
    with usage_errors(f"--resume {folder}: "):
        return checkpoint.load(path)


def take_run_settings(args, settings: dict, keys, command: str) -> None:
    """Put a resumed run's own ``settings`` into ``args``. An option the user set on the command line
    to another value is a usage error (the parser's ``option_defaults`` tell which were set); only
    --steps, --checkpoint-every and --quiet may change, and --steps left out keeps the run's."""
    from .errors import CliError

    defaults = args.option_defaults
    for key in keys:
        given = getattr(args, key)
        if given != defaults[key] and given != settings[key]:
            raise CliError(f"--{key.replace('_', '-')} {given} differs from the resumed run's {settings[key]}; "
                           f"--resume continues with the run's own settings (only --steps, --checkpoint-every and "
                           f"--quiet may change; see {command} --help)")
        setattr(args, key, settings[key])
    if args.steps == defaults["steps"]:
        args.steps = settings["steps"]
