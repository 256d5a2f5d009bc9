"""Checks of a saved MFAC state before anything is loaded (validate, then mutate)."""

from __future__ import annotations

import torch

from ..fisher.base import all_finite, compute_dtype

__all__ = ["check_saved_state"]


def _describe(shard) -> str:
    return "one process (no process_group)" if shard is None else f"process {shard.get('rank')} of {shard.get('world_size')}"


def check_saved_state(optimizer, state_dict) -> tuple[dict, dict]:
    """Split ``state_dict`` (from ``MFAC.state_dict()``) into torch's part and MFAC's ``"mfac"``
    entry, checking that entry against ``optimizer``: its keys, d, the process layout, the step
    counts, the window's settings (window, damp, storage dtype, density: their tensors are the
    window's to check, once, when it loads) and the momentum buffer. Raises ValueError naming the
    entry and the fix; changes nothing."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("mfac"), dict):
        raise ValueError("this state dict has no 'mfac' entry: it was not saved by MFAC.state_dict()")
    state_dict = dict(state_dict)
    extra = state_dict.pop("mfac")
    missing = {"dim", "steps", "skipped_steps", "window", "momentum"} - set(extra)
    if missing:
        raise ValueError(f"the state dict's 'mfac' entry is missing {sorted(missing)}; pass the output of "
                         f"MFAC.state_dict()")
    if extra["dim"] != optimizer.dim or isinstance(extra["dim"], bool):
        raise ValueError(f"the state dict is for parameters with d = {extra['dim']!r} coordinates, but this "
                         f"optimizer's parameters have d = {optimizer.dim:,}; load it into an MFAC built on the "
                         f"same model")
    saved_shard, mine = extra.get("shard"), optimizer.distributor.describe()
    if saved_shard != mine:
        raise ValueError(f"the state dict was saved by {_describe(saved_shard)}, but this optimizer runs as "
                         f"{_describe(mine)}; each process loads the state it saved, with the same number of "
                         f"processes")
    for key in ("steps", "skipped_steps"):
        if isinstance(extra[key], bool) or not isinstance(extra[key], int) or extra[key] < 0:
            raise ValueError(f"the state dict's mfac.{key} must be an int >= 0, got {extra[key]!r}")
    window = extra["window"]
    dtype = optimizer.storage_dtype
    if window is not None:
        if not isinstance(window, dict):
            raise ValueError(f"the state dict's window must be a dict from state_dict(), got {type(window).__name__}")
        for key, mine, fix in (("window", optimizer.window_size, "window"), ("damp", optimizer.damp, "damp"),
                               ("storage_dtype", str(dtype), "window_dtype"),
                               ("density", optimizer.density, "density")):
            saved = window.get(key, 1.0 if key == "density" else None)
            if saved != mine:
                raise ValueError(f"the state dict's window has {key} = {saved!r} but this optimizer has {key} = "
                                 f"{mine!r}; construct MFAC with the same {fix} to resume")
    elif extra["steps"] > 0:
        raise ValueError(f"the state dict records {extra['steps']} steps but no window; it is not from "
                         f"MFAC.state_dict()")
    momentum = extra["momentum"]
    if momentum is not None:
        expected = compute_dtype(dtype)
        if not isinstance(momentum, torch.Tensor) or momentum.shape != (optimizer.dim,) or momentum.dtype != expected:
            got = (f"{tuple(momentum.shape)} {momentum.dtype}" if isinstance(momentum, torch.Tensor)
                   else type(momentum).__name__)
            raise ValueError(f"the state dict's momentum must be a ({optimizer.dim},) {expected} tensor, got {got}")
        if not all_finite(momentum):
            raise ValueError("the state dict's momentum contains NaN or Inf")
    return state_dict, extra
