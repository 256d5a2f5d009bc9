"""The progress bar of a pruning call, for ``mfac prune`` and ``mfac demo``."""

from __future__ import annotations

from contextlib import contextmanager

from ..progress import Progress

__all__ = ["pruning_progress"]


@contextmanager
def pruning_progress(method: str, sub_steps: int, num_grads: int, desc: str, quiet: bool):
    """One bar for a pruning call: OBS counts gradient rows (the slow part) over all sub-steps and
    shows the sparsity reached; magnitude has a single step. Yields the keyword arguments
    (``callback``, ``on_gradient_rows``) to pass to :func:`mfac.prune.prune_oneshot`."""
    if method != "obs":
        with Progress(1, desc, quiet) as bar:
            yield {"callback": lambda done, total, sparsity: bar.update(1, sparsity=sparsity)}
        return
    with Progress(sub_steps * num_grads, f"{desc}, gradients", quiet) as bar:
        state = {"sparsity": 0.0}

        def on_rows(n):
            bar.update(n, sparsity=state["sparsity"])

        def after_step(done, total, sparsity):
            state["sparsity"] = sparsity

        yield {"callback": after_step, "on_gradient_rows": on_rows}
