"""``mfac bench``: the benchmark scripts' quick mode.

The scripts live in the ``benchmarks/`` folder of a source checkout, not in the installed package.
``--benchmarks DIR`` names that folder; without it, the checkout this package was installed from
(``pip install -e .``) is used when it has one. Otherwise the command exits with status 2 and says
what it needs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .errors import CliError, RunError

__all__ = ["SCRIPTS", "find_benchmarks", "run"]

# Each script with the arguments of its quick mode.
SCRIPTS = (("fisher.py", "--quick"), ("optimizer.py", "--quick", "--part", "1"),
           ("pruning.py", "--quick", "--part", "digits"))


def _has_scripts(folder: Path) -> bool:
    return all((folder / script[0]).is_file() for script in SCRIPTS)


def find_benchmarks(given: str | None) -> Path:
    """The folder of the benchmark scripts: ``given`` (checked), else the source checkout's
    ``benchmarks/`` beside the package (``src/mfac`` -> ``benchmarks``) when it is there."""
    names = ", ".join(script[0] for script in SCRIPTS)
    if given is not None:
        folder = Path(given)
        if not _has_scripts(folder):
            raise CliError(f"--benchmarks {folder}: not the benchmarks/ folder of an mfac source checkout "
                           f"(it needs {names})")
        return folder.resolve()
    package = Path(__file__).resolve().parents[1]
    folder = package.parents[1] / "benchmarks"
    if not _has_scripts(folder):
        raise CliError(f"mfac bench needs the benchmarks/ folder of a source checkout of mfac ({names}), and this "
                       f"installation ({package}) has none: clone the repository and pip install -e . there, or "
                       f"pass --benchmarks DIR")
    return folder


def run(args) -> int:
    folder = find_benchmarks(args.benchmarks)
    for script in SCRIPTS:
        print(f"\n$ python {folder.name}/{' '.join(script)}", flush=True)
        result = subprocess.run([sys.executable, str(folder / script[0]), *script[1:]], cwd=folder.parent)
        if result.returncode != 0:
            raise RunError(f"{folder.name}/{script[0]} failed with exit status {result.returncode}")
    return 0
