"""Conformance: every FisherInverse implementation against the dense float64 matrix it represents.

One harness, in the style of curvlinops (one shared check runs every linear operator against its
dense matrix). Each implementation in ``mfac.fisher`` has a builder that makes the object and
returns, with it, the dense float64 F it must represent, formed from the gradients the object
actually holds:

* ``DenseFisherInverse``, ``StaticFisherInverse``, ``BlockFisherInverse`` (from a gradient matrix in
  float64, float32 or bfloat16, and accumulated by ``from_chunks`` in float64 or float32, with a
  pruning mask): F = damp*I + G^T G / m over the gradients as given (rounded to their dtype),
  block-diagonal for the block inverse, with the damping the object reports; a relative damping
  must resolve to relative_damp * mean(diag(G^T G / m)).
* ``SlidingWindowFisherInverse`` in float64, float32, bfloat16 and float16 storage and
  ``CompressedWindowFisherInverse`` with float32 and bfloat16 values, filled by push, push_ihvp,
  two extends, or pushes and a state round trip: F = damp*I + R^T R / k with R = ``window.rows()``,
  the rows held after rounding or compression. R itself is checked too: for the dense windows it is
  the last k gradients pushed, rounded to the storage dtype; compressed rows hold at most ``nnz``
  entries each.

Then ``check_conformance`` asks every object the same questions: ihvp on (d,), (1, d), (k, d),
non-contiguous and other-dtype inputs; diag; element on ints, 0-d tensors and index tensors (int64,
int32, empty); column on an int and a 0-d tensor; to_dense; dim / num_grads / damp / dtype / device /
nbytes against what the builder expects; and that no query changes its argument or the object.
Accuracy is backward stability: relative error <= 100 * eps(compute dtype) * cond(F), with a floor
(``conftest.tolerance``, the project standard).

Inputs: the named awkward matrices of ``conftest.make_grads`` (m > d, m = 1, d = 1, rank-deficient,
repeated, collinear, all-zero, empty, non-contiguous, rows at scales over 12 orders of magnitude)
times dampings over 11 orders; and hypothesis-drawn hostile gradients (``conftest.gradient_rows``),
where ihvp is also checked against a reference refined in extended precision. A new implementation
added to ``mfac.fisher`` fails ``test_every_implementation_is_covered`` until it has a builder here.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

import mfac.fisher
from conftest import (ALL_DEVICES, CASES, MORE_CASES, assert_backward_stable, assert_same, block_dense_fisher,
                      check_against, dense_fisher, extended_fisher, gradient_rows, make_grads, rel_err, snapshot,
                      solve, tolerance)
from mfac.fisher import (BlockFisherInverse, CompressedWindowFisherInverse, DenseFisherInverse, FisherInverse,
                         SlidingWindowFisherInverse, StaticFisherInverse)
from mfac.fisher.compressed import compressed_nbytes

F32_TINY = torch.finfo(torch.float32).tiny
FILLS = ("push", "push_ihvp", "extend", "round_trip")
THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def one_thread():
    """Every matrix here is tiny: one thread is fastest, and on a loaded machine over 50x faster
    (the threads of each parallel region wait on each other). Restored after every test."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(THREADS)


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype results come back in for gradients (or a window) stored in ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class Subject:
    """An object under test, and what it must be."""

    obj: FisherInverse
    fisher: torch.Tensor  # the dense float64 F it represents (CPU)
    rows: torch.Tensor  # the float64 rows F is formed from (masked, rounded or compressed as held)
    num_grads: int
    damp: float  # the damping it must report
    dtype: torch.dtype  # the dtype of its results, whose eps bounds their error
    nbytes: tuple[int, int]  # the range its nbytes must fall in
    damp_rtol: float = 0.0  # how closely obj.damp must equal ``damp`` (0: exactly)
    block: int | None = None  # the block size of a block-diagonal F


# Builders: the object, and the dense float64 F of what it holds -------------------------------------

def block_widths(d: int, size: int) -> list[int]:
    full, last = divmod(d, size)
    return [size] * full + ([last] if last else [])


def packed_lower_numbers(width: int) -> int:
    """Numbers a streamed block of ``width`` keeps: its lower triangle by rows, each row's i + 1
    entries rounded up to 32 (never past the width)."""
    return sum(min(width, -(-(i + 1) // 32) * 32) for i in range(width))


def resolved_damp(rows: torch.Tensor, relative: float) -> float:
    """relative * mean(diag(G^T G / m)); relative itself when every gradient is zero; at least the
    smallest normal float32 (the rule documented in mfac/fisher/blocks.py)."""
    m, d = rows.shape
    mean = float(rows.square().sum()) / (max(m, 1) * d)
    return max(relative * mean if mean > 0 else relative, F32_TINY)


def build_dense(grads, damp, device, dtype=torch.float64):
    g = grads.to(device, dtype)
    rows, (m, d) = g.double().cpu(), g.shape
    size = 2 * d * d * result_dtype(dtype).itemsize  # the factor and the explicit inverse
    return Subject(DenseFisherInverse(g, damp), dense_fisher(rows, damp), rows, m, damp, result_dtype(dtype),
                   (size, size))


def build_block(grads, damp, device, block_size=None, dtype=torch.float64, relative=False):
    """BlockFisherInverse (StaticFisherInverse when ``block_size`` is None): each block keeps the
    smaller of its two exact factors, B x B or m x B, in the result dtype."""
    g = grads.to(device, dtype)
    rows, (m, d) = g.double().cpu(), g.shape
    absolute, relative_damp = (None, damp) if relative else (damp, None)
    if block_size is None:
        obj, size = StaticFisherInverse(g, absolute, relative_damp=relative_damp), d
    else:
        obj, size = BlockFisherInverse(g, absolute, block_size, relative_damp=relative_damp), min(block_size, d)
    expected = resolved_damp(rows, damp) if relative else damp
    nbytes = sum(w * min(w, m) for w in block_widths(d, size)) * result_dtype(dtype).itemsize
    return Subject(obj, block_dense_fisher(rows, obj.damp, size), rows, m, expected, result_dtype(dtype),
                   (nbytes, nbytes), damp_rtol=1e-12 if relative else 0.0, block=size)


def build_chunks(grads, damp, device, block_size, dtype=torch.float64, masked=False, relative=False):
    """BlockFisherInverse.from_chunks over chunks of 3 rows; ``masked`` prunes every third
    coordinate (F as if those columns of G were zero). Always the primal route: B x B per block."""
    m, d = grads.shape
    mask = torch.arange(d) % 3 != 1 if masked else torch.ones(d, dtype=torch.bool)
    chunks = [c.to(device, dtype) for c in grads.split(3)] if m else []
    absolute, relative_damp = (None, damp) if relative else (damp, None)
    obj = BlockFisherInverse.from_chunks(chunks, d, block_size, damp=absolute, relative_damp=relative_damp,
                                         device=device, dtype=dtype, mask=mask.to(device) if masked else None)
    rows = grads.to(dtype).double().cpu() * mask
    size = min(block_size, d)
    expected = resolved_damp(rows, damp) if relative else damp
    nbytes = sum(packed_lower_numbers(w) for w in block_widths(d, size)) * dtype.itemsize
    return Subject(obj, block_dense_fisher(rows, obj.damp, size), rows, m, expected, dtype, (nbytes, nbytes),
                   damp_rtol=(1e-12 if dtype == torch.float64 else 1e-5) if relative else 0.0, block=size)


def fill_window(make, pushed: torch.Tensor, fill: str):
    """A window from ``make()`` holding the rows of ``pushed``: pushed one at a time ("push"),
    with push_ihvp ("push_ihvp": also returns the last result and the row as stored), in two
    extends ("extend"), or pushed then restored into a new window from its state ("round_trip")."""
    window, last = make(), None
    if fill == "extend":
        half = len(pushed) // 2
        window.extend(pushed[:half])
        window.extend(pushed[half:])
        return window, None
    for g in pushed:
        if fill == "push_ihvp":
            residual = getattr(window, "residual", None)  # the compressed window's error feedback
            out = window.push_ihvp(g)
            if residual is None:
                stored = g.to(window.storage_dtype).double()
            else:  # kept + new residual = old residual + g, exactly (float32 differences of the same numbers)
                stored = (residual + g.float() - window.residual).double()
            last = (out, stored.cpu())
        else:
            window.push(g)
    if fill == "round_trip":
        restored = make()
        restored.load_state_dict(window.state_dict())
        assert_same(snapshot(restored), snapshot(window))
        probe = torch.randn(window.dim, generator=torch.Generator().manual_seed(5)).to(window.device, window.dtype)
        assert torch.equal(restored.ihvp(probe), window.ihvp(probe))
        window = restored
    return window, last


def check_last_push(last, fisher, dtype):
    """push_ihvp's result: F^-1 of the row as stored, with that row already in the window (where
    cond(F) is within what the float64 reference resolves)."""
    if last is not None:
        out, stored = last
        assert out.dtype == dtype and torch.isfinite(out).all()
        tol = tolerance(fisher, dtype)
        if tol < 1:
            assert rel_err(out, solve(fisher, stored)) <= tol


def build_window(grads, damp, device, storage, capacity, fill):
    """SlidingWindowFisherInverse: gradients arrive in the compute dtype (float16 ones clamped to
    +-1e3, since float16 overflows past 65504); F is over ``rows()``, which must be the last
    ``capacity`` of them rounded to the storage dtype. nbytes: at least the rows, at most the peak
    the constructor checks for (rows, a half-precision window's two reused d-vectors, and 6
    capacity^2 float64)."""
    m, d = grads.shape
    pushed = grads.to(device, result_dtype(storage))
    if storage == torch.float16:
        pushed = pushed.clamp(-1e3, 1e3)
    window, last = fill_window(lambda: SlidingWindowFisherInverse(d, capacity, damp, dtype=storage, device=device),
                               pushed, fill)
    rows = window.rows()
    k = min(m, capacity)
    assert rows.shape == (k, d) and rows.dtype == torch.float64 and rows.device == window.device
    rows = rows.cpu()
    held = pushed[m - k:].to(storage).double().cpu()
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, held.tolist()))  # the same rows, in any order
    fisher = dense_fisher(rows, damp)
    check_last_push(last, fisher, result_dtype(storage))
    least = capacity * d * storage.itemsize
    spares = d * (storage.itemsize + 4) if storage.itemsize < 4 else 0
    return Subject(window, fisher, rows, k, damp, result_dtype(storage),
                   (least, least + spares + 6 * capacity * capacity * 8))


def build_compressed(grads, damp, device, storage, capacity, fill, density, block):
    """CompressedWindowFisherInverse: F is over ``rows()``, the compressed rows held; each keeps at
    most ``nnz`` entries, representable in the storage dtype. nbytes: at least the kept values and
    their int16 offsets, at most ``compressed_nbytes`` (the peak the constructor checks for)."""
    m, d = grads.shape
    window, last = fill_window(
        lambda: CompressedWindowFisherInverse(d, capacity, damp, density, dtype=storage, device=device, block=block),
        grads.to(device, torch.float32), fill)
    rows = window.rows()
    k = min(m, capacity)
    assert rows.shape == (k, d) and rows.dtype == torch.float64 and rows.device == window.device
    rows = rows.cpu()
    assert bool(((rows != 0).sum(1) <= window.nnz).all())
    assert torch.equal(rows.to(storage).double(), rows)
    fisher = dense_fisher(rows, damp)
    check_last_push(last, fisher, torch.float32)
    least = capacity * window.nnz * (storage.itemsize + 2)
    return Subject(window, fisher, rows, k, damp, torch.float32,
                   (least, compressed_nbytes(d, capacity, density, storage, window.block)))


# The implementations: builders, option sets for the fixed grid, and option strategies for hypothesis --

def wrap(m, d):
    return max(1, (m + 1) // 2)  # the window wraps around and holds the later half


def roomy(m, d):
    return m + 2  # never full: normalised by the rows held, not the capacity


def below_d(m, d):
    return max(1, min(d - 1, (m + 1) // 2))  # a compressed window needs d > capacity


@dataclass(frozen=True)
class Impl:
    name: str
    cls: type
    build: Callable[..., Subject]
    grid: tuple[tuple[str, Callable[[int, int], dict]], ...]  # (label, options for an (m, d) matrix)
    options: Callable[[int], st.SearchStrategy]  # hypothesis: option dicts for dimension d
    min_dim: int = 1
    damps: tuple[float, ...] = (1e-6, 1e-2, 1e3)
    full_grid: bool = False  # every option set x case x damp; otherwise case i takes option i and damp i (mod)


def fixed(**options):
    return lambda m, d: options


def none(d):
    return st.just({})


def window_impl(storage: torch.dtype) -> Impl:
    name = str(storage).removeprefix("torch.")
    grid = (("wrap-push_ihvp", lambda m, d: {"capacity": wrap(m, d), "fill": "push_ihvp"}),
            ("roomy-extend", lambda m, d: {"capacity": roomy(m, d), "fill": "extend"}),
            ("wrap-round_trip", lambda m, d: {"capacity": wrap(m, d), "fill": "round_trip"}),
            ("roomy-push", lambda m, d: {"capacity": roomy(m, d), "fill": "push"}))
    options = lambda d: st.fixed_dictionaries({"capacity": st.integers(1, 8), "fill": st.sampled_from(FILLS)})
    return Impl(f"window-{name}", SlidingWindowFisherInverse,
                lambda g, damp, dev, **o: build_window(g, damp, dev, storage, **o), grid, options)


def compressed_impl(storage: torch.dtype, density: float | None, block: int | None, label: str) -> Impl:
    """``density``/``block`` None: density 1 and one block of d (nothing left out)."""
    def grid_options(fill):
        return lambda m, d: {"capacity": below_d(m, d), "fill": fill, "density": density or 1.0,
                             "block": block or d}

    def options(d):
        return st.fixed_dictionaries({"capacity": st.integers(1, min(8, d - 1)), "fill": st.sampled_from(FILLS),
                                      "density": st.sampled_from([0.1, 0.3, 0.5, 1.0]) if density else st.just(1.0),
                                      "block": st.integers(1, d) if block else st.just(d)})
    return Impl(f"compressed-{label}", CompressedWindowFisherInverse,
                lambda g, damp, dev, **o: build_compressed(g, damp, dev, storage, **o),
                tuple((fill, grid_options(fill)) for fill in FILLS), options, min_dim=2)


IMPLS = [
    Impl("dense", DenseFisherInverse, build_dense, (("", fixed()),), none, damps=(1e-8, 1e-2, 1e3), full_grid=True),
    Impl("dense-float32", DenseFisherInverse, lambda g, damp, dev: build_dense(g, damp, dev, torch.float32),
         (("", fixed()),), none),
    Impl("static", StaticFisherInverse, build_block, (("", fixed()),), none, damps=(1e-8, 1e-2, 1e3),
         full_grid=True),
    Impl("static-float32", StaticFisherInverse, lambda g, damp, dev: build_block(g, damp, dev, dtype=torch.float32),
         (("", fixed()),), none),
    Impl("static-relative", StaticFisherInverse, lambda g, damp, dev: build_block(g, damp, dev, relative=True),
         (("", fixed()),), none),
    Impl("block", BlockFisherInverse, build_block,
         tuple((f"B{size}", fixed(block_size=size)) for size in (1, 4, 7, 100)),
         lambda d: st.fixed_dictionaries({"block_size": st.integers(1, 30)}), damps=(1e-6, 1e-1), full_grid=True),
    Impl("block-bfloat16", BlockFisherInverse,
         lambda g, damp, dev, **o: build_block(g, damp, dev, dtype=torch.bfloat16, **o),
         (("B5", fixed(block_size=5)),), lambda d: st.fixed_dictionaries({"block_size": st.integers(1, 30)})),
    Impl("block-relative", BlockFisherInverse, lambda g, damp, dev, **o: build_block(g, damp, dev, relative=True, **o),
         (("B4", fixed(block_size=4)),), lambda d: st.fixed_dictionaries({"block_size": st.integers(1, 30)})),
    Impl("chunks", BlockFisherInverse, build_chunks,
         (("B4", fixed(block_size=4)), ("B6-masked", fixed(block_size=6, masked=True)),
          ("B5-relative", fixed(block_size=5, relative=True))),
         lambda d: st.fixed_dictionaries({"block_size": st.integers(1, 30), "masked": st.booleans(),
                                          "relative": st.booleans()})),
    Impl("chunks-float32", BlockFisherInverse,
         lambda g, damp, dev, **o: build_chunks(g, damp, dev, dtype=torch.float32, **o),
         (("B4-masked", fixed(block_size=4, masked=True)), ("B100-relative", fixed(block_size=100, relative=True))),
         lambda d: st.fixed_dictionaries({"block_size": st.integers(1, 30), "masked": st.booleans(),
                                          "relative": st.booleans()})),
    *(window_impl(storage) for storage in (torch.float64, torch.float32, torch.bfloat16, torch.float16)),
    compressed_impl(torch.float32, 0.3, 5, "float32"),
    compressed_impl(torch.bfloat16, 0.5, 4, "bfloat16"),
    compressed_impl(torch.float32, None, None, "density1"),
]


def grid_params():
    """Every case for every implementation. The exact inverses (dense, static, block) get every
    option set and damp on every case; the others rotate options and damps over the cases (12 cases,
    4 option sets, 3 damps: each pair of option set and damp once)."""
    for impl in IMPLS:
        cases = [case for case in CASES + MORE_CASES if make_grads(case).shape[1] >= impl.min_dim]
        for n, case in enumerate(cases):
            if impl.full_grid:
                combos = [(label, options, damp) for label, options in impl.grid for damp in impl.damps]
            else:
                combos = [(*impl.grid[n % len(impl.grid)], impl.damps[n % len(impl.damps)])]
            for label, options, damp in combos:
                yield pytest.param(impl, options, case, damp,
                                   id="-".join(filter(None, [impl.name, label, case, f"{damp:g}"])))


# The protocol check ------------------------------------------------------------------------------

def check_conformance(s: Subject, seed: int = 1) -> None:
    """Every query of the FisherInverse protocol against F^-1 for the dense float64 ``s.fisher``,
    within the backward-stability tolerance; the reported attributes against ``s``; and that the
    queries change neither their arguments nor the object."""
    obj, fisher = s.obj, s.fisher
    d, dev = fisher.shape[0], obj.device
    tol = tolerance(fisher, s.dtype)

    # What the object says it is.
    assert isinstance(obj, FisherInverse) and type(obj).__name__ in repr(obj)
    assert type(obj.dim) is int and obj.dim == d
    assert type(obj.num_grads) is int and obj.num_grads == s.num_grads
    assert isinstance(obj.damp, float) and obj.damp > 0
    assert math.isclose(obj.damp, s.damp, rel_tol=s.damp_rtol) if s.damp_rtol else obj.damp == s.damp
    assert obj.dtype == s.dtype and isinstance(dev, torch.device)
    assert type(obj.nbytes) is int and s.nbytes[0] <= obj.nbytes <= s.nbytes[1], (obj.nbytes, s.nbytes)

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(d, generator=gen, dtype=torch.float64)
    first = obj.ihvp(x.to(dev, obj.dtype))
    state = snapshot(obj) if hasattr(obj, "state_dict") else None
    nbytes = obj.nbytes

    # The checks every static inverse always had: ihvp (batch, single, strided), diag, element, column.
    check_against(obj, fisher, tol, seed)

    # ihvp: every accepted shape and layout, in any floating dtype; results in obj.dtype on obj.device.
    reference = solve(fisher, torch.eye(d, dtype=torch.float64))
    xs = torch.randn(3, d, generator=gen, dtype=torch.float64)
    strided = torch.randn(d, 3, generator=gen, dtype=torch.float64).T  # (3, d), not contiguous
    other = torch.float32 if obj.dtype == torch.float64 else torch.float64
    for label, arg in (("(d,)", x.to(dev, obj.dtype)), ("(1, d)", xs[:1].to(dev, obj.dtype)),
                       ("(k, d)", xs.to(dev, obj.dtype)), ("strided (k, d)", strided.to(dev, obj.dtype)),
                       (f"(k, d) in {other}", xs.to(dev, other))):
        kept = arg.clone()
        out = obj.ihvp(arg)
        assert out.shape == arg.shape and out.dtype == obj.dtype and out.device == dev, label
        assert torch.equal(arg, kept), f"ihvp changed its argument {label}"
        expected = solve(fisher, arg.double().cpu().reshape(-1, d).T).T.reshape(arg.shape)
        assert rel_err(out, expected) <= tol, (label, rel_err(out, expected), tol)

    # diag, to_dense.
    diag = obj.diag()
    assert diag.shape == (d,) and diag.dtype == obj.dtype and diag.device == dev
    dense = obj.to_dense()
    assert dense.shape == (d, d) and dense.dtype == obj.dtype and dense.device == dev
    assert rel_err(dense, reference) <= tol

    # element: ints and 0-d tensors give 0-d results; index tensors of any integer dtype, or empty.
    scale = tol * float(reference.abs().max())
    i = torch.tensor([0, d - 1, d // 2, d - 1, 0])
    j = torch.tensor([d - 1, 0, d // 2, d - 1, d // 3])
    got = obj.element(i.to(dev), j.to(dev))
    assert got.shape == (5,) and got.dtype == obj.dtype and got.device == dev
    assert float((got.double().cpu() - reference[i, j]).abs().max()) <= scale
    assert torch.equal(obj.element(i.to(dev, torch.int32), j.to(dev, torch.int32)), got)
    assert float((obj.element(j.to(dev), i.to(dev)).double().cpu() - reference[i, j]).abs().max()) <= scale
    for a, b in ((0, 0), (torch.tensor(d - 1), torch.tensor(d // 2))):
        value = obj.element(a, b)
        assert value.shape == () and value.dtype == obj.dtype and value.device == dev
        assert abs(float(value) - float(reference[int(a), int(b)])) <= scale
    empty = torch.zeros(0, dtype=torch.long, device=dev)
    assert obj.element(empty, empty).shape == (0,)

    # column: an int or a 0-d tensor.
    for col in {0, d // 2, d - 1}:
        column = obj.column(col)
        assert column.shape == (d,) and column.dtype == obj.dtype and column.device == dev
        assert torch.equal(obj.column(torch.tensor(col)), column)
        assert rel_err(column, reference[:, col]) <= tol

    # Nothing the queries did changed the object.
    assert torch.equal(obj.ihvp(x.to(dev, obj.dtype)), first)
    assert obj.nbytes == nbytes and obj.num_grads == s.num_grads
    if state is not None:
        assert_same(snapshot(obj), state)


# The tests -------------------------------------------------------------------------------------------

def test_every_implementation_is_covered():
    """Every concrete FisherInverse that mfac.fisher exports has a builder in IMPLS."""
    exported = {obj for name in mfac.fisher.__all__ if inspect.isclass(obj := getattr(mfac.fisher, name))
                and issubclass(obj, FisherInverse) and not inspect.isabstract(obj)}
    assert exported == {impl.cls for impl in IMPLS}


@pytest.mark.parametrize("impl,options,case,damp", list(grid_params()))
def test_conforms_on_awkward_gradients(impl, options, case, damp):
    grads = make_grads(case)
    check_conformance(impl.build(grads, damp, "cpu", **options(*grads.shape)))


damps = st.floats(-8, 2).map(lambda e: 10.0 ** e)


@pytest.mark.parametrize("impl", IMPLS, ids=[impl.name for impl in IMPLS])
@given(data=st.data())
def test_backward_stable_on_hostile_gradients(impl, data):
    """Gradients with scales over 12 orders and duplicate, zero, collinear and rank-deficient rows,
    damp over 10 orders: ihvp within 100 * eps * cond(F) of a reference refined in extended
    precision, for x random and for x the largest gradient (the nearly cancelling case of the
    Woodbury form); and the whole protocol where cond(F) is within what float64 resolves."""
    d, m, seed = data.draw(st.tuples(st.integers(impl.min_dim, 24), st.integers(0, 30), st.integers(0, 2**30)))
    damp = data.draw(damps)
    grads = data.draw(gradient_rows(d, m, seed))
    s = impl.build(grads, damp, "cpu", **data.draw(impl.options(d)))
    assert_backward_stable(s.obj, s.fisher, s.rows, s.dtype, seed, extended_fisher(s.rows, s.obj.damp, s.block))
    resolved = tolerance(s.fisher, s.dtype) < 1  # beyond, the float64 reference resolves nothing
    event("whole protocol checked" if resolved else "cond(F) too large: ihvp finite only")
    if resolved:
        check_conformance(s, seed)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("impl", IMPLS, ids=[impl.name for impl in IMPLS])
def test_conforms_on_every_device(impl, device):
    grads = make_grads("wide")
    s = impl.build(grads.to(device), 1e-2, device, **impl.grid[0][1](*grads.shape))
    assert s.obj.device.type == device
    check_conformance(s)


def some_subject(impl: Impl, case="wide", damp=1e-2) -> Subject:
    grads = make_grads(case)
    return impl.build(grads, damp, "cpu", **impl.grid[0][1](*grads.shape))


@pytest.mark.parametrize("impl", IMPLS, ids=[impl.name for impl in IMPLS])
def test_empty_batch_of_vectors(impl):
    obj = some_subject(impl).obj
    out = obj.ihvp(torch.zeros(0, obj.dim, dtype=obj.dtype))
    assert out.shape == (0, obj.dim) and out.dtype == obj.dtype


@pytest.mark.parametrize("impl", IMPLS, ids=[impl.name for impl in IMPLS])
def test_results_belong_to_the_caller(impl):
    """Writing into a returned tensor changes nothing in the object (results are not views of its state)."""
    obj = some_subject(impl).obj
    x = torch.randn(obj.dim, dtype=obj.dtype)
    i = torch.tensor([0, 1, 2])
    queries = {"ihvp": lambda: obj.ihvp(x), "diag": obj.diag, "column": lambda: obj.column(1),
               "to_dense": obj.to_dense, "element": lambda: obj.element(i, i.flip(0))}
    for name, query in queries.items():
        result = query()
        kept = result.clone()
        result.add_(1.0)
        assert torch.equal(query(), kept), name


@pytest.mark.parametrize("impl", IMPLS, ids=[impl.name for impl in IMPLS])
def test_scalar_element_belongs_to_the_caller(impl):
    obj = some_subject(impl).obj
    value = obj.element(3, 4)
    kept = value.clone()
    value.add_(1.0)
    assert torch.equal(obj.element(3, 4), kept)


def test_from_chunks_accepts_an_empty_chunk():
    grads = make_grads("wide")
    obj = BlockFisherInverse.from_chunks([grads[:4], grads[:0], grads[4:]], grads.shape[1], 4, damp=1e-2,
                                         dtype=torch.float64)
    check_against(obj, block_dense_fisher(grads, 1e-2, 4), 1e-10)
