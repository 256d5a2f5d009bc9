"""The checkpoint schema of every window form, checked once.

A window's ``state_dict()`` holds its settings (``dim``, ``window``, ``damp``, ``storage_dtype``
and the storage form's own, e.g. ``density`` and ``block``), the count of pushes, the float64 Gram
matrix S = G G^T, and the storage form's tensors (dense rows; or values, offsets and the residual).
:func:`validate` checks all of it against the window that is to load it, without allocating
anything of the size the state claims, and raises ValueError naming the key; nothing is changed.
"""

from __future__ import annotations

import torch

from .base import all_finite

__all__ = ["validate", "COMMON_KEYS"]

COMMON_KEYS = ("dim", "window", "damp", "storage_dtype", "pushed", "gram")
# Written by dense windows that kept an explicit K^-1 (before the Cholesky factor); ignored on load.
LEGACY_KEYS = frozenset({"inverse", "since_refactor", "refactor_every"})


def validate(state, window) -> int:
    """Check ``state`` (from ``state_dict()``) against ``window`` (a SlidingWindowFisherInverse);
    returns the number of rows it holds. The rows' squared norms are summed over the shards of a
    sharded window (``window.reduce``, a collective: every shard must load at once)."""
    storage = window.storage
    if not isinstance(state, dict):
        raise ValueError(f"window state must be a dict from state_dict(), got {type(state).__name__}")
    state = {key: value for key, value in state.items() if key not in LEGACY_KEYS}
    spec = storage.tensor_spec()
    expected = {"dim": window.dim, "window": window.window, "damp": window.damp,
                "storage_dtype": str(window.storage_dtype), **storage.settings()}
    required = set(COMMON_KEYS) | set(expected) | set(spec)
    if set(state) != required:
        raise ValueError(f"window state must have exactly the keys {sorted(required)}; missing "
                         f"{sorted(required - set(state))}, unknown {sorted(set(state) - required)}; pass the output "
                         f"of state_dict()")
    for key, mine in expected.items():
        if type(state[key]) is not type(mine) or state[key] != mine:
            raise ValueError(f"window state has {key} = {state[key]!r} but this window has {key} = {mine!r}; "
                             f"construct it with the same {key} as the one that was saved")
    pushed = state["pushed"]
    if isinstance(pushed, bool) or not isinstance(pushed, int) or pushed < 0:
        raise ValueError(f"window state has pushed = {pushed!r}; it must be an int >= 0")
    spec["gram"] = ((window.window, window.window), torch.float64)
    for key, (shape, dtype) in spec.items():
        tensor = state[key]
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            got = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"window state's {key} must be a {shape} {dtype} tensor, got {got}: the window must "
                             f"load as saved, without a change of dtype")
        if tensor.is_floating_point() and not all_finite(tensor):
            raise ValueError(f"window state's {key} contains NaN or Inf")
    k = min(pushed, window.window)
    gram = state["gram"]
    if not torch.equal(gram, gram.T):
        raise ValueError("window state's gram is not symmetric; it does not come from state_dict()")
    if bool(gram[k:].any()):
        raise ValueError(f"window state holds data beyond the {k} gradients that pushed = {pushed} implies")
    tensors = {key: state[key].to(window.device) for key in spec if key != "gram"}
    storage.check_state(tensors, k)
    norms = window.reduce(storage.row_norms(tensors, k).to(window.device))
    if not torch.allclose(gram.diagonal()[:k].to(norms.device), norms, rtol=1e-3, atol=1e-30):
        raise ValueError("window state's gram does not match its rows (the diagonal must hold the rows' squared "
                         "norms); the tensors come from different states")
    return k
