"""``mfac bench``: the benchmark scripts' quick mode, from a source checkout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .common import CliError, RunError


def run(args) -> int:
    folder = Path(__file__).resolve().parents[3] / "benchmarks"
    if not (folder / "fisher.py").exists():
        raise CliError("mfac bench runs the scripts in the source checkout's benchmarks/ folder, which this "
                       "installation does not have; clone the repository and pip install -e . there")
    scripts = [["fisher.py", "--quick"], ["optimizer.py", "--quick", "--part", "1"],
               ["pruning.py", "--quick", "--part", "digits"]]
    for script in scripts:
        print(f"\n$ python benchmarks/{' '.join(script)}", flush=True)
        result = subprocess.run([sys.executable, str(folder / script[0]), *script[1:]], cwd=folder.parent)
        if result.returncode != 0:
            raise RunError(f"benchmarks/{script[0]} failed with exit status {result.returncode}")
    return 0
