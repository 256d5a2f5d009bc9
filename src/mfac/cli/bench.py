"""``mfac bench``: the benchmark scripts' quick mode.

The scripts live in the ``benchmarks/`` folder of a source checkout, not in the installed package.
``--benchmarks DIR`` names that folder; without it, the checkout this package was installed from
(``pip install -e .``) is used when it has one. Otherwise the command exits with status 2 and says
what it needs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from .errors import CliError, RunError

__all__ = ["ABOUT", "INTRO", "SCRIPTS", "find_benchmarks", "run"]

# Each script with the arguments of its quick mode.
SCRIPTS = (("fisher.py", "--quick"), ("optimizer.py", "--quick", "--part", "1"),
           ("pruning.py", "--quick", "--part", "digits"))

# What each script measures (printed before it runs; each script prints its own column legend).
ABOUT = {
    "fisher.py": "the Fisher-inverse core: a sliding window's push_ihvp against the floor (two reads of the "
                 "window), and static and block-diagonal inverses, at d = 10k and 100k, m = 64 and 256",
    "optimizer.py": "the cost of one optimizer step on ResNet-20 (272k weights): SGD, Adam and MFAC with "
                    "windows of 64 and 256, each MFAC step against its window-read floor",
    "pruning.py": "one-shot pruning of a digits MLP to 50, 80, 90% and 2:4: magnitude, OBS in one step and "
                  "OBS with 16 recomputations; test accuracy and seconds per prune",
}

INTRO = ("mfac bench: the quick mode of three benchmark scripts (a few minutes on an idle laptop CPU; longer "
         "on a busy machine). Every time is repeated: tables show the median and [min-max] of the repeats "
         "and a reps column, and each script explains its columns above its table. Ratios to the floor are "
         "what to compare between machines; absolute times depend on the machine and its load.")


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
    print(INTRO, flush=True)
    for script in SCRIPTS:
        print(f"\n$ python {folder.name}/{' '.join(script)}\n# {ABOUT[script[0]]}", flush=True)
        start = time.perf_counter()
        result = subprocess.run([sys.executable, str(folder / script[0]), *script[1:]], cwd=folder.parent)
        if result.returncode != 0:
            raise RunError(f"{folder.name}/{script[0]} failed with exit status {result.returncode}")
        print(f"# {script[0]} took {time.perf_counter() - start:.0f} s", flush=True)
    return 0
