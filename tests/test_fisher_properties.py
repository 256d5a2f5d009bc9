"""Property tests: every Fisher-inverse class is backward stable on hostile inputs.

Gradients are drawn with scales over 12 orders of magnitude and with duplicate, zero, collinear
and rank-deficient rows; damp over 10 orders. For every input the relative error of F^-1 x
against a dense float64 Cholesky solve must stay within 100 * eps * cond(F) (``tolerance``),
for x random and for x equal to a gradient (the nearly cancelling case of the Woodbury form).
The sliding window also runs random sequences of push / push_ihvp / extend / state round trips /
refused pushes. The number of examples comes from the hypothesis profile in conftest.py.
"""

import math

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import block_dense_fisher, dense_fisher, rel_err, solve, tolerance
from mfac.fisher import (BlockFisherInverse, DenseFisherInverse, NonFiniteGradientError, SlidingWindowFisherInverse,
                         StaticFisherInverse)

ROW_KINDS = ("random", "duplicate", "zero", "collinear", "combination")


@st.composite
def gradient_rows(draw, d: int, count: int, seed: int):
    """(count, d) float64 rows: random rows at scales 10^-6..10^6, and rows that repeat, scale or
    combine earlier ones, or are zero."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        kind = draw(st.sampled_from(ROW_KINDS)) if rows else "random"
        scale = 10.0 ** draw(st.floats(-6, 6))
        if kind == "random":
            row = torch.randn(d, generator=gen, dtype=torch.float64) * scale
        elif kind == "duplicate":
            row = rows[draw(st.integers(0, len(rows) - 1))].clone()
        elif kind == "zero":
            row = torch.zeros(d, dtype=torch.float64)
        elif kind == "collinear":
            row = rows[draw(st.integers(0, len(rows) - 1))] * (10.0 ** draw(st.floats(-3, 3)))
        else:
            weights = torch.randn(len(rows), generator=gen, dtype=torch.float64)
            row = weights @ torch.stack(rows)
        rows.append(row)
    return torch.stack(rows) if rows else torch.zeros(0, d, dtype=torch.float64)


def probes(grads: torch.Tensor, seed: int) -> torch.Tensor:
    """A random vector and (when there are gradients) the largest gradient: (n, d)."""
    x = torch.randn(1, grads.shape[1], generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    if len(grads) and float(grads.abs().max()) > 0:
        x = torch.cat([x, grads[grads.norm(dim=1).argmax()][None]])
    return x


def extended_fisher(grads: torch.Tensor, damp: float, block: int | None = None) -> np.ndarray:
    """F (block-diagonal with ``block``) formed in extended precision (x87 80-bit on x86)."""
    g = grads.double().cpu().numpy().astype(np.longdouble)
    m, d = g.shape
    fisher = g.T @ g / max(m, 1)
    if block is not None:
        blocks = np.arange(d) // block
        fisher = np.where(blocks[:, None] == blocks[None, :], fisher, 0)
    return fisher + np.longdouble(damp) * np.eye(d, dtype=np.longdouble)


def reference_solve(fisher: torch.Tensor, extended: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """F^-1 x refined to extended precision: a float64 Cholesky solve, then three rounds of
    iterative refinement with residuals computed in extended precision. Its own error is far below
    eps64 * cond(F), so the comparison measures only the method under test."""
    target = x.double().cpu().numpy().astype(np.longdouble)
    y = solve(fisher, x).numpy().astype(np.longdouble)
    for _ in range(3):
        residual = torch.from_numpy((target - extended @ y).astype(np.float64))
        y = y + solve(fisher, residual).numpy().astype(np.longdouble)
    return torch.from_numpy(y.astype(np.float64))


def assert_backward_stable(obj, fisher, grads, dtype, seed, extended=None):
    tol = tolerance(fisher, dtype)
    for x in probes(grads, seed):
        got = obj.ihvp(x.to(obj.dtype))
        assert torch.isfinite(got).all()
        if tol >= 1:  # cond(F) beyond what float64 (the reference's precision) resolves
            continue
        expected = solve(fisher, x) if extended is None else reference_solve(fisher, extended, x)
        assert rel_err(got, expected) <= tol, (rel_err(got, expected), tol)


shapes = st.tuples(st.integers(1, 24), st.integers(0, 30), st.integers(0, 2**30))
damps = st.floats(-8, 2).map(lambda e: 10.0 ** e)


@given(shapes=shapes, damp=damps, data=st.data())
def test_static_and_dense_are_backward_stable(shapes, damp, data):
    d, m, seed = shapes
    grads = data.draw(gradient_rows(d, m, seed))
    fisher, extended = dense_fisher(grads, damp), extended_fisher(grads, damp)
    for cls in (DenseFisherInverse, StaticFisherInverse):
        assert_backward_stable(cls(grads, damp), fisher, grads, torch.float64, seed, extended)


@given(shapes=shapes, damp=damps, block=st.integers(1, 30), data=st.data())
def test_block_is_backward_stable(shapes, damp, block, data):
    d, m, seed = shapes
    grads = data.draw(gradient_rows(d, m, seed))
    obj = BlockFisherInverse(grads, damp, block)
    fisher, extended = block_dense_fisher(grads, damp, min(block, d)), extended_fisher(grads, damp, min(block, d))
    assert_backward_stable(obj, fisher, grads, torch.float64, seed, extended)


def assert_unchanged(window, before):
    after = window.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]) if isinstance(value, torch.Tensor) else value == after[key], key


@given(d=st.integers(1, 20), capacity=st.integers(1, 8), damp=damps, seed=st.integers(0, 2**30),
       storage=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
       ops=st.lists(st.sampled_from(["push", "push_ihvp", "extend", "round_trip", "refused"]), min_size=1,
                    max_size=14),
       data=st.data())
def test_window_is_backward_stable_under_any_sequence(d, capacity, damp, seed, storage, ops, data):
    compute = torch.float32 if storage != torch.float64 else torch.float64
    if storage == torch.float16:  # keep rows representable: float16 overflows past 65504
        rows = data.draw(gradient_rows(d, 3 * len(ops), seed)).clamp(-1e3, 1e3)
    else:
        rows = data.draw(gradient_rows(d, 3 * len(ops), seed))
    window = SlidingWindowFisherInverse(d, capacity, damp, dtype=storage)
    history = []  # what the window should hold, rounded to its storage dtype, in float64
    cursor = 0
    for op in ops:
        if op in ("push", "push_ihvp"):
            g = rows[cursor].to(compute)
            cursor += 1
            if op == "push":
                window.push(g)
            else:
                out = window.push_ihvp(g)
            history.append(g.to(storage).double())
            if op == "push_ihvp":
                held = torch.stack(history[-capacity:])
                fisher = dense_fisher(held, damp)
                assert torch.isfinite(out).all()
                if tolerance(fisher, compute) < 1:
                    assert rel_err(out, solve(fisher, history[-1])) <= tolerance(fisher, compute)
        elif op == "extend":
            n = data.draw(st.integers(0, 3))
            batch = rows[cursor: cursor + n].to(compute)
            cursor += n
            window.extend(batch)
            history.extend(batch.to(storage).double())
        elif op == "round_trip":
            restored = SlidingWindowFisherInverse(d, capacity, damp, dtype=storage)
            restored.load_state_dict(window.state_dict())
            x = torch.randn(d, dtype=compute)
            assert torch.equal(restored.ihvp(x), window.ihvp(x))
            window = restored
        else:
            before = window.state_dict()
            poisoned = rows[cursor].to(compute).clone()
            poisoned[data.draw(st.integers(0, d - 1))] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
            try:
                window.push_ihvp(poisoned)
            except NonFiniteGradientError:
                pass
            else:
                raise AssertionError("a non-finite gradient entered the window")
            assert_unchanged(window, before)
        assert window.pushed == len(history) and window.num_grads == min(len(history), capacity)
    held = torch.stack(history[-capacity:]) if history else torch.zeros(0, d, dtype=torch.float64)
    fisher = dense_fisher(held, damp)
    assert_backward_stable(window, fisher, held, compute, seed, extended_fisher(held, damp))
    if tolerance(fisher, compute) < 1:
        diag_reference = solve(fisher, torch.eye(d, dtype=torch.float64)).diagonal()
        assert rel_err(window.diag(), diag_reference) <= tolerance(fisher, compute)
