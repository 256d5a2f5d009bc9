"""Progress reporting for long loops: a tqdm bar on a terminal, plain lines in logs, or nothing.

tqdm is optional (``pip install "mfac-torch[cli]"``); without it, or when stderr is not a terminal
(CI logs), progress is printed as a few plain lines instead.

* :class:`Progress`: one bar (or its plain lines) for a loop of known length.
* :func:`pruning_hooks`: the bar of one pruning call, as the ``callback``/``on_gradient_rows``
  hooks of :func:`mfac.prune.prune_oneshot` (which uses it for ``progress=True``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

__all__ = ["Progress", "pruning_hooks"]


class Progress:
    """``with Progress(total, "training", quiet) as bar: ... bar.update(1, loss=0.3)``."""

    def __init__(self, total: int, desc: str, quiet: bool = False, stream: TextIO | None = None) -> None:
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

    def update(self, n: int = 1, **info: Any) -> None:
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

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> bool:
        if self._bar is not None:
            self._bar.close()
        return False


@contextmanager
def pruning_hooks(method: str, sub_steps: int, num_grads: int, desc: str, quiet: bool = False, *,
                  callback: Callable | None = None, on_gradient_rows: Callable | None = None,
                  stream: TextIO | None = None) -> Iterator[dict[str, Callable]]:
    """One bar for a pruning call: OBS counts gradient rows (the slow part) over all ``sub_steps``
    of ``num_grads`` rows and shows the sparsity reached; magnitude has a single step. Yields the
    keyword arguments (``callback``, ``on_gradient_rows``) to pass to
    :func:`mfac.prune.prune_oneshot`; the caller's own ``callback`` and ``on_gradient_rows``, if
    given, are called too, after the bar."""
    obs = method == "obs"
    total, label = (sub_steps * num_grads, f"{desc}, gradients") if obs else (1, desc)
    with Progress(total, label, quiet, stream) as bar:
        state = {"sparsity": 0.0}

        def on_rows(n):
            bar.update(n, sparsity=state["sparsity"])
            if on_gradient_rows is not None:
                on_gradient_rows(n)

        def sub_step(done, total, sparsity):
            state["sparsity"] = sparsity
            if not obs or done == total:  # OBS: the sparsity reached, once the last rows are in
                bar.update(0 if obs else 1, sparsity=sparsity)
            if callback is not None:
                callback(done, total, sparsity)

        yield {"callback": sub_step, "on_gradient_rows": on_rows} if obs else {"callback": sub_step}
