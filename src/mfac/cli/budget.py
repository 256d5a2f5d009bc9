"""What a training run will hold: the optimizer's memory and the size of one checkpoint, stated
before training starts, and refused (exit status 2) when it cannot fit, with the numbers and the
flags that fix it.

* Memory: the parameters and their gradients, plus the optimizer's state: MFAC's window at its peak
  (:func:`mfac.fisher.window.window_nbytes`, or :func:`mfac.fisher.compressed.compressed_nbytes`
  for a compressed window) and its three vectors of d; Adam's two moments; SGD's momentum. Compared
  with :func:`mfac.resources.available_bytes` (MemAvailable, RLIMIT_AS and cgroup limits).
  Activations are not counted.
* A checkpoint: the model's state, the optimizer's saved state (MFAC: the window's rows, its Gram
  matrix and the momentum) and a little more; written atomically, so the file system needs room for
  two while one replaces the other."""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

from .. import resources
from ..fisher.compressed import DEFAULT_BLOCK, CompressedRows, compressed_nbytes
from ..fisher.rows import DenseRows
from ..fisher.window import GRAM_COPIES, window_nbytes
from .errors import CliError
from .optimizers import DTYPES

__all__ = ["human_bytes", "estimate", "check_budget"]


def human_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{int(n)} B"


def _model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def estimate(model: nn.Module, optimizer: str, settings: dict) -> dict:
    """Bytes of the run (see the module docstring) and the words that describe the optimizer's
    state. ``settings``: momentum, window, density, window_dtype (as :func:`make_optimizer` takes them)."""
    dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    if optimizer == "mfac":
        window, density = settings["window"], settings["density"]
        dtype = DTYPES[settings["window_dtype"]]
        if density < 1:
            state = compressed_nbytes(dim, window, density, dtype)
            unsaved = CompressedRows.unsaved_nbytes_for(dim, density, DEFAULT_BLOCK)
        else:
            state = window_nbytes(dim, window, dtype)
            unsaved = DenseRows.unsaved_nbytes_for(dim, dtype)
        gram = window * window * 8
        # saved: the rows, the Gram matrix and the factor, the momentum (not what is kept for reuse)
        saved = state - unsaved - (GRAM_COPIES - 2) * gram + dim * 4
        state += 3 * dim * 4
        what = (f"MFAC's window of {window} gradients of {dim:,} coordinates in {settings['window_dtype']}"
                f"{f' at density {density:g}' if density < 1 else ''}")
    else:
        vectors = 2 if optimizer == "adam" else (1 if settings.get("momentum") else 0)
        state = saved = vectors * dim * 4
        what = f"{'Adam' if optimizer == 'adam' else 'SGD'}'s state ({vectors} vector(s) of {dim:,} coordinates)"
    return {"dim": dim, "optimizer_bytes": state, "model_bytes": 2 * params, "checkpoint_bytes":
            _model_bytes(model) + saved, "what": what}


def check_budget(model: nn.Module, optimizer: str, settings: dict, out: Path, checkpoint_every: int,
                 quiet: bool) -> dict:
    """Print the run's memory and checkpoint size (unless ``quiet``) and refuse what cannot fit:
    the optimizer in memory, or (with checkpoints) two checkpoints on the disk of ``out``. Returns
    the figures for the report."""
    figures = estimate(model, optimizer, settings)
    need = figures["optimizer_bytes"] + figures["model_bytes"]
    available = resources.available_bytes("cpu")
    if available is not None and need > available:
        fix = ("lower --window, pass --density 0.01 (a compressed window) or --window-dtype bfloat16, or use "
               "--optimizer adam" if optimizer == "mfac" else "use a smaller model or a machine with more memory")
        raise CliError(f"{figures['what']} needs {human_bytes(figures['optimizer_bytes'])} (with the model and its "
                       f"gradients {human_bytes(need)}), but only {human_bytes(available)} of memory is available; "
                       f"{fix}")
    if checkpoint_every:
        folder = Path(out).absolute()
        while not folder.exists() and folder.parent != folder:
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        if 2 * figures["checkpoint_bytes"] > free:
            raise CliError(f"one checkpoint takes {human_bytes(figures['checkpoint_bytes'])} and replacing it needs "
                           f"room for two, but only {human_bytes(free)} is free where --out {out} is; pass "
                           f"--checkpoint-every 0 (no checkpoints: the run cannot be resumed) or choose another --out")
    if not quiet:
        checkpoints = (f"one checkpoint: {human_bytes(figures['checkpoint_bytes'])}, written every {checkpoint_every} "
                       f"steps (--checkpoint-every 0: none)" if checkpoint_every else "no checkpoints "
                       "(--checkpoint-every 0)")
        print(f"memory: {figures['what']}: {human_bytes(figures['optimizer_bytes'])}"
              f"{f' of {human_bytes(available)} available' if available is not None else ''}; {checkpoints}",
              flush=True)
    return {key: figures[key] for key in ("dim", "optimizer_bytes", "checkpoint_bytes")}
