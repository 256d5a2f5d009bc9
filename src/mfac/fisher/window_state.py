"""The checkpoint schema of every window form, checked once.

A window's ``state_dict()`` holds its settings (``dim``, ``window``, ``damp``, ``storage_dtype``
and the storage form's own, e.g. ``density`` and ``block``), the count of pushes, the float64 Gram
matrix S = G G^T, the Cholesky factor of K (optional: states written before it was saved are
refactorised on load), and the storage form's tensors (dense rows; or values, offsets and the
residual).
:func:`validate` checks all of it against the window that is to load it, without allocating
anything of the size the state claims, and raises ValueError naming the key; nothing is changed.

Self-consistency: the Gram matrix must be the one of the rows. Its diagonal must hold the rows'
squared norms, and for a fixed probe vector v, S v must equal G (G^T v) within what float32 (or
float64) rounding of the dot products allows. Both sides come from one pass over the stored rows in
float64, a few megabytes at a time (:func:`probe_products`), so an edited Gram entry, rows from
another state, or a shard of another run is refused, while every state ``state_dict()`` wrote loads.
A dual-route factor (:func:`holds_factor`) must be upper triangular with a positive diagonal, zero
beyond the k gradients held, and one of K: U^T U z within a few times the drift an updated factor
may have (or that a fresh factorisation of the saved S has, if larger) of K z for the same probe.

A sharded window (``window.reduce`` sums over the shards) checks its own shard first, then all
shards agree on the outcome (``window.reduce.agree`` when the hook has it, as
:func:`mfac.distributed.sum_over`'s does; otherwise a flag summed through ``reduce``), so a state
refused on one process is refused on every process, promptly, before any of them waits in a
collective; the probe products are then summed over the shards, and the outcome agreed again.
"""

from __future__ import annotations

import torch

from .base import all_finite
from . import woodbury

__all__ = ["validate", "holds_factor", "probe_products", "probe_vector", "gram_tolerance", "COMMON_KEYS"]

COMMON_KEYS = ("dim", "window", "damp", "storage_dtype", "pushed", "gram")
# Written by dense windows that kept an explicit K^-1 (before the Cholesky factor); ignored on load.
LEGACY_KEYS = frozenset({"inverse", "since_refactor", "refactor_every"})
CHUNK = 1 << 20  # float64 numbers of the rows upcast at a time by the probe pass (8 MB)
# Unit roundoff of float32 products under torch's reduced-precision matmul settings (TF32, bfloat16).
MATMUL_ROUNDOFF = {"highest": 2.0 ** -24, "high": 2.0 ** -11, "medium": 2.0 ** -8}


def validate(state, window) -> int:
    """Check ``state`` (from ``state_dict()``) against ``window`` (a SlidingWindowFisherInverse);
    returns the number of rows it holds. For a sharded window (``window.reduce``, a collective) every
    shard must call this at once; a failure on any shard raises on all of them."""
    error = checked = None
    try:
        checked = check_local(state, window)
    except Exception as failure:  # noqa: BLE001 - any local failure must reach the other shards
        error = failure
    agree(window, error, -1 if checked is None else checked[0])
    k, gram, partial = checked
    reduced = window.reduce(partial)  # every shard reached this point: the collective cannot wait forever
    error = None
    try:
        check_gram(window, gram, reduced, k)
        if holds_factor(state, window):  # checked against S once S is known to be the rows'
            check_factor(window, state["factor"].to(window.device), gram, state["pushed"])
    except ValueError as failure:
        error = failure
    agree(window, error, k)
    return k


def check_local(state, window) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The checks of this shard alone; returns (k, gram, this shard's probe products)."""
    storage = window.storage
    if not isinstance(state, dict):
        raise ValueError(f"window state must be a dict from state_dict(), got {type(state).__name__}")
    state = {key: value for key, value in state.items() if key not in LEGACY_KEYS}
    spec = storage.tensor_spec()
    expected = {"dim": window.dim, "window": window.window, "damp": window.damp,
                "storage_dtype": str(window.storage_dtype), **storage.settings()}
    required = set(COMMON_KEYS) | set(expected) | set(spec)
    if not required <= set(state) <= required | {"factor"}:
        raise ValueError(f"window state must have exactly the keys {sorted(required)} (and factor); missing "
                         f"{sorted(required - set(state))}, unknown {sorted(set(state) - required - {'factor'})}; "
                         f"pass the output of state_dict()")
    for key, mine in expected.items():
        if type(state[key]) is not type(mine) or state[key] != mine:
            raise ValueError(f"window state has {key} = {state[key]!r} but this window has {key} = {mine!r}; "
                             f"construct it with the same {key} as the one that was saved")
    pushed = state["pushed"]
    if isinstance(pushed, bool) or not isinstance(pushed, int) or pushed < 0:
        raise ValueError(f"window state has pushed = {pushed!r}; it must be an int >= 0")
    spec["gram"] = ((window.window, window.window), torch.float64)
    if "factor" in state:
        spec["factor"] = ((window.window, window.window), torch.float64)
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
    tensors = {key: state[key].to(window.device) for key in spec if key not in ("gram", "factor")}
    storage.check_state(tensors, k)
    gram = gram[:k, :k].to(window.device)
    return k, gram, probe_products(storage, tensors, k, probe_vector(k, window.device))


def agree(window, error: BaseException | None, k: int) -> None:
    """Raise on every shard if the checks failed on any (on a whole window: raise ``error`` if any)."""
    hook = getattr(window.reduce, "agree", None)
    if hook is not None:
        hook(error, window.device, same={"the gradients held (pushed)": k})  # the same keys on every shard
        return
    flags = window.reduce(torch.tensor([float(error is not None), 1.0, float(k), float(k) ** 2],
                                       dtype=torch.float64, device=window.device))
    if error is not None:
        raise error
    failed, shards, total, squares = flags.tolist()
    if failed:
        raise ValueError(f"window state: {failed:.0f} of the {shards:.0f} shards refused their part of the state "
                         f"(each reports why); nothing was loaded")
    if shards * squares != total ** 2:
        raise ValueError("window state: the shards hold different numbers of gradients; every shard must load the "
                         "state saved by the same run at the same step")


def probe_vector(k: int, device) -> torch.Tensor:
    """The fixed probe v (k,) float64: magnitudes in [0.5, 1.5), random signs, the same on every shard."""
    gen = torch.Generator().manual_seed(0x5EED)
    magnitude = 0.5 + torch.rand(k, generator=gen, dtype=torch.float64)
    sign = torch.randint(0, 2, (k,), generator=gen).to(torch.float64) * 2 - 1
    return (magnitude * sign).to(device)


def probe_products(storage, tensors: dict, k: int, v: torch.Tensor) -> torch.Tensor:
    """(2k + 1,) float64: the rows' squared norms, G (G^T v), and the coordinates held, for this
    shard's part of the rows in ``tensors`` (dense ``grads``, or a compressed form's ``values`` and
    ``offsets`` laid out as ``storage.layout`` says). One pass over the rows, in float64, CHUNK
    numbers at a time: G (G^T v) is the sum over column blocks c of G_c (G_c^T v)."""
    norms = torch.zeros(k, dtype=torch.float64, device=v.device)
    products = torch.zeros(k, dtype=torch.float64, device=v.device)
    if k and "grads" in tensors:
        grads = tensors["grads"]
        step = max(1, CHUNK // k)
        for start in range(0, grads.shape[1], step):
            block = grads[:k, start:start + step].to(torch.float64)
            norms += block.square().sum(1)
            products += block @ (block.T @ v)
    elif k:
        compressed_products(storage, tensors, k, v, norms, products)
    dim = torch.tensor([float(storage.dim)], dtype=torch.float64, device=v.device)
    return torch.cat([norms, products, dim])


def compressed_products(storage, tensors: dict, k: int, v: torch.Tensor, norms: torch.Tensor,
                        products: torch.Tensor) -> None:
    """:func:`probe_products` for a compressed window, a group of whole blocks at a time (so each
    group's slice of G^T v is complete before it is used); adds into ``norms`` and ``products``."""
    layout, values, offsets = storage.layout, tensors["values"], tensors["offsets"]
    starts = layout.starts.tolist()
    rows = torch.arange(k, device=v.device)[:, None]
    blocks, first = len(starts) - 1, 0
    while first < blocks:
        last = first + 1
        while last < blocks and k * (starts[last + 1] - starts[first]) <= CHUNK:
            last += 1
        entries = slice(starts[first], starts[last])
        positions = layout.first[entries] + rows * layout.kept[entries]  # (k, entries)
        kept = values[positions].to(torch.float64)
        coords = offsets[positions].long() + (layout.bases[entries] - first * storage.block)
        width = min(last * storage.block, storage.dim) - first * storage.block
        slice_of_gtv = torch.zeros(width, dtype=torch.float64, device=v.device)
        slice_of_gtv.index_add_(0, coords.reshape(-1), (kept * v[:, None]).reshape(-1))
        norms += kept.square().sum(1)
        products += (kept * slice_of_gtv[coords]).sum(1)
        first = last


def gram_tolerance(window, norms: torch.Tensor, v: torch.Tensor, dim: float) -> torch.Tensor:
    """How far S v may lie from G (G^T v), per row i, for a genuine S. Each entry of S is a dot
    product of ``dim`` terms rounded in the compute dtype: off by at most e_ij = gamma ||g_i|| ||g_j||,
    gamma = dim * u (whatever the order of summation), plus the float64 rounding of both sides. So
    row i of S v is off by at most sum_j e_ij |v_j|; and since the signs of v are drawn independently
    of S, also (Hoeffding) by more than 10 sqrt(sum_j (e_ij v_j)^2) with probability below 1e-21:
    the smaller of the two bounds, doubled for safety."""
    if window.dtype == torch.float32:
        roundoff = max(MATMUL_ROUNDOFF.get(torch.get_float32_matmul_precision(), 2.0 ** -24),
                       2.0 ** -11 if torch.backends.cuda.matmul.allow_tf32 else 2.0 ** -24)
    else:
        roundoff = torch.finfo(window.dtype).eps / 2
    k = norms.shape[0]
    gamma = 2 * (dim * roundoff + (dim + 2 * k + 2) * 2.0 ** -53)
    lengths = norms.clamp_min(0).sqrt()
    weighted = lengths * v.abs()
    return gamma * lengths * torch.minimum(weighted.sum(), 10 * weighted.norm())


def check_gram(window, gram: torch.Tensor, reduced: torch.Tensor, k: int) -> None:
    """The Gram matrix against the rows, from the probe products summed over the shards."""
    norms, products, dim = reduced[:k], reduced[k:2 * k], float(reduced[2 * k])
    if not torch.allclose(gram.diagonal(), norms, rtol=1e-3, atol=1e-30):
        raise ValueError("window state's gram does not match its rows (the diagonal must hold the rows' squared "
                         "norms); the tensors come from different states")
    if k == 0:
        return
    v = probe_vector(k, gram.device)
    excess = (gram @ v - products).abs() - gram_tolerance(window, norms, v, dim)
    if bool((excess > 0).any()):
        row = int(excess.argmax())
        raise ValueError(f"window state's gram does not match its rows: row {row} of the gram matrix is not the dot "
                         f"products of gradient {row} with the others (beyond float rounding); the gram was edited "
                         f"or comes from another state")


def holds_factor(state: dict, window) -> bool:
    """Whether ``state`` carries a factor for ``window`` to use: dual route, and not all zero (states
    from the primal route, templates never filled and states from before factors were saved have
    none, and are refactorised)."""
    factor = state.get("factor")
    return window.route == "dual" and isinstance(factor, torch.Tensor) and bool(factor.any())


def check_factor(window, factor: torch.Tensor, gram: torch.Tensor, pushed: int) -> None:
    """The saved dual-route factor against K = k*damp*I + S (see the module docstring); ValueError
    naming ``factor``."""
    k = gram.shape[0]
    upper = factor[:k, :k]
    if bool(factor.tril(-1).any()) or bool(factor[k:].any()) or bool(factor[:, k:].any()):
        raise ValueError(f"window state's factor must be upper triangular and zero beyond its first {k} rows and "
                         f"columns; it does not come from state_dict()")
    if not bool((upper.diagonal() > 0).all()):
        raise ValueError("window state's factor has a diagonal entry <= 0; it is not a Cholesky factor")
    offset = pushed % window.window % k
    z = probe_vector(k, gram.device)
    k_times_z = woodbury.dual_matrix(gram, window.damp, offset) @ z
    drift = woodbury.drift(woodbury.Factor(upper.contiguous(), offset).product(z), k_times_z)
    if drift <= 4 * woodbury.drift_tolerance(k):
        return
    fresh = woodbury.factor(gram, None, window.damp, primal=False, offset=offset)
    if drift > 4 * woodbury.drift(fresh.product(z), k_times_z):  # round-off may keep even a fresh factor this far
        raise ValueError(f"window state's factor is not one of the saved Gram matrix (relative residual {drift:.2g} "
                         f"on a probe); the factor was edited or comes from another state")
