"""Property tests of the sliding window under any sequence of operations.

Random sequences of push / push_ihvp / extend / state round trips / refused pushes, on gradients
drawn with scales over 12 orders of magnitude and with duplicate, zero, collinear and
rank-deficient rows, damp over 10 orders, in every storage dtype. After every push_ihvp, and at
the end for ihvp and diag, the relative error against a dense float64 solve over the gradients the
window should hold must stay within 100 * eps * cond(F) (``tolerance``); a refused push must leave
the window unchanged. The number of examples comes from the hypothesis profile in conftest.py.

The backward-stability properties every Fisher-inverse class shares (dense, static, block, the
windows and the compressed window, on the same hostile gradients) are in
test_fisher_conformance.py.
"""

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import assert_backward_stable, dense_fisher, extended_fisher, gradient_rows, rel_err, solve, tolerance
from mfac.fisher import NonFiniteGradientError, SlidingWindowFisherInverse

damps = st.floats(-8, 2).map(lambda e: 10.0 ** e)


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
