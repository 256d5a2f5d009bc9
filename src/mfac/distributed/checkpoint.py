"""MFAC's state for ``torch.distributed.checkpoint`` (DCP), resharded on load.

Whatever the layout (one process, a window sharded under DDP, FSDP2's sharded parameters), the
window's rows are saved as the (m, d) tensor of one process's window, d in the order of the
parameters, and the momentum as its (d,) vector, each process writing the coordinates it holds
(its optimizer's distributor converts), so a checkpoint saved by N processes loads into M
processes (or one), with DDP or FSDP2, and each reads only its shard. Everything here goes through
MFAC's public state (``state_dict``, ``load_state_dict``, its settings) and its distributor.
"""

from __future__ import annotations

import torch

from .. import resources
from ..fisher.base import compute_dtype

__all__ = ["get_optimizer_state_dict", "set_optimizer_state_dict"]


def _empty_window(optimizer) -> dict:
    """A window state of the saved sizes holding nothing: the template DCP loads into."""
    dtype, device, m = optimizer.storage_dtype, optimizer.device, optimizer.window_size
    rows = optimizer.distributor.window_dim(optimizer.dim)
    return {"dim": rows, "window": m, "damp": optimizer.damp, "storage_dtype": str(dtype), "pushed": 0,
            "grads": torch.zeros(m, rows, dtype=dtype, device=device),
            "gram": torch.zeros(m, m, dtype=torch.float64, device=device),
            "factor": torch.zeros(m, m, dtype=torch.float64, device=device)}


def get_optimizer_state_dict(optimizer) -> dict:
    """MFAC's state in a form ``torch.distributed.checkpoint`` saves and reshards.

    The same as ``optimizer.state_dict()`` but for the window: its rows are one (m, d) DTensor sharded
    by coordinates over the optimizer's process group (a plain (m, d) tensor in one process), and
    nothing in it names a process. Every process calls it, at once, with the same optimizer settings.
    Before the first step it returns an empty window of the right sizes, which is what
    :func:`set_optimizer_state_dict` needs as a template to load into::

        state = {"model": model.state_dict(), "optim": mfac.distributed.get_optimizer_state_dict(opt)}
        torch.distributed.checkpoint.save(state, checkpoint_id=folder)
        ...                                    # later, with any number of processes
        state = {"model": model.state_dict(), "optim": mfac.distributed.get_optimizer_state_dict(opt)}
        torch.distributed.checkpoint.load(state, checkpoint_id=folder)
        model.load_state_dict(state["model"])
        mfac.distributed.set_optimizer_state_dict(opt, state["optim"])

    Memory: a copy of this process's window rows (m x d / world numbers) while the dict lives (two
    under FSDP2). Compressed windows (density < 1) run in one process and are returned as in
    ``state_dict()``.
    """
    distributor = optimizer.distributor
    if optimizer.density < 1:  # the compressed window is copied as it is stored
        rows_bytes = 0 if optimizer.fisher is None else optimizer.fisher.nbytes
    else:
        rows_bytes = optimizer.window_size * distributor.window_dim(optimizer.dim) * optimizer.storage_dtype.itemsize
    resources.check_fits(2 * rows_bytes if distributor.sharded_params else rows_bytes, optimizer.device,
                         "a copy of this process's MFAC window for a checkpoint",
                         "save each process's optimizer.state_dict() with torch.save instead, or free memory first")
    state = optimizer.state_dict()
    if optimizer.density < 1:
        return state
    extra = dict(state["mfac"])
    if extra["window"] is None:
        extra["window"] = _empty_window(optimizer)
        if any(group["momentum"] for group in optimizer.param_groups):
            extra["momentum"] = torch.zeros(optimizer.dim, dtype=compute_dtype(optimizer.storage_dtype),
                                            device=optimizer.device)
    window = dict(extra["window"])
    window["grads"] = distributor.to_checkpoint(window["grads"], rows=True)
    if extra.get("momentum") is not None:
        extra["momentum"] = distributor.to_checkpoint(extra["momentum"], rows=False)
    window["dim"] = extra["dim"] = optimizer.global_dim
    extra["window"], extra["shard"] = window, None
    state["mfac"] = extra
    return state


def set_optimizer_state_dict(optimizer, state: dict) -> None:
    """Load a state from :func:`get_optimizer_state_dict` (after ``torch.distributed.checkpoint.load``
    filled it) into ``optimizer``, which may run on a different number of processes than the one
    that saved it. Every process calls it at once; it is checked as ``MFAC.load_state_dict`` checks a
    state, and a failed load leaves the optimizer unchanged. A state refused by one process is
    refused by all of them, with the same message."""
    error = prepared = None
    try:
        prepared = _local_state(optimizer, state)
    except Exception as failure:  # noqa: BLE001 - every process must hear of any failure
        error = failure
    optimizer.distributor.fail_together(error, optimizer.device)
    optimizer.load_state_dict(prepared)


def _local_state(optimizer, state: dict) -> dict:
    """``state`` as ``optimizer.load_state_dict`` takes it on this process: its shard of the rows."""
    if not isinstance(state, dict) or not isinstance(state.get("mfac"), dict):
        raise ValueError("state must be the dict from mfac.distributed.get_optimizer_state_dict(), filled by "
                         "torch.distributed.checkpoint.load")
    if optimizer.density < 1:
        return state
    distributor = optimizer.distributor
    state = dict(state)
    extra = dict(state["mfac"])
    window = dict(extra["window"]) if isinstance(extra.get("window"), dict) else None
    dim = optimizer.global_dim
    for saved in (extra.get("dim"), None if window is None else window.get("dim")):
        if saved is not None and saved != dim:
            raise ValueError(f"the checkpoint's window has d = {saved!r} coordinates but this optimizer's "
                             f"parameters have d = {dim:,}; load it into an MFAC built on the same model")
    if window is not None:
        window["grads"] = distributor.from_checkpoint(window.get("grads"))
        window["dim"] = distributor.window_dim(optimizer.dim)
        if distributor.sharded_params and extra.get("momentum") is not None:
            extra["momentum"] = distributor.from_checkpoint(extra["momentum"])
        if extra.get("steps") == 0 and window.get("pushed") == 0:  # saved before the first step
            window = None
            if isinstance(extra.get("momentum"), torch.Tensor) and not extra["momentum"].any():
                extra["momentum"] = None
    extra["window"], extra["dim"], extra["shard"] = window, optimizer.dim, distributor.describe()
    state["mfac"] = extra
    return state
