"""Progress reporting for long loops: a tqdm bar on a terminal, plain lines in logs, or nothing.

tqdm is optional (``pip install mfac[cli]``); without it, or when stderr is not a terminal (CI
logs), progress is printed as a few plain lines instead.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress(total, "training", quiet) as bar: ... bar.update(1, loss=0.3)``."""

    def __init__(self, total: int, desc: str, quiet: bool = False, stream=None):
        self.total, self.desc, self.quiet = total, desc, quiet
        self.stream = stream if stream is not None else sys.stderr
        self.done, self._bar, self._next_line, self._start = 0, None, 0.0, time.perf_counter()
        if quiet:
            return
        if self.stream.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, file=self.stream, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1, **info) -> None:
        self.done += n
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.update(n)
            if info:
                self._bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in info.items()},
                                      refresh=False)
            return
        fraction = self.done / max(self.total, 1)
        if fraction >= self._next_line or self.done == self.total:
            extra = "".join(f" {k}={v:.4g}" if isinstance(v, float) else f" {k}={v}" for k, v in info.items())
            print(f"{self.desc}: {self.done}/{self.total} ({time.perf_counter() - self._start:.1f}s){extra}",
                  file=self.stream, flush=True)
            self._next_line = fraction + 0.25

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.close()
        return False
