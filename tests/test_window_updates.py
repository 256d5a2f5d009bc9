"""The O(m^2) push of a full window: the updated Cholesky factor against a refactorisation and
against the dense inverse over long, awkward streams; the drift check; the saved factor."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import dense_fisher, gradient_rows, rel_err, solve, tolerance
from mfac import kernels
from mfac.fisher import SlidingWindowFisherInverse, woodbury

needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"compiled kernels: {kernels.status()}")


@pytest.fixture(autouse=True)
def update_every_window_size(monkeypatch):
    """Small windows normally refactorise (it is faster there); here they take the update too."""
    monkeypatch.setattr(woodbury, "SMALLEST_UPDATED", 2)


def count_refactorisations(monkeypatch) -> list:
    calls = []
    original = woodbury.factor

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(woodbury, "factor", counting)
    return calls


def awkward_stream(n: int, d: int, seed: int) -> torch.Tensor:
    """Rows at scales 10^-4..10^2, with runs of one direction, zero rows and exact repeats."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, d, generator=gen, dtype=torch.float64)
    rows *= 10.0 ** (6 * torch.rand(n, 1, generator=gen, dtype=torch.float64) - 4)
    rows[5::11] = rows[4::11][: len(rows[5::11])] * -3.0  # collinear with the row before
    rows[7::13] = 0.0
    rows[9::17] = rows[2::17][: len(rows[9::17])]  # repeats of rows long gone or still held
    return rows


@needs_kernel
@pytest.mark.parametrize("damp", [1e-4, 1e-2, 10.0])
@pytest.mark.parametrize("d,window", [(40, 8), (64, 2), (120, 31)])
def test_full_window_pushes_update_the_factor_and_stay_backward_stable(monkeypatch, d, window, damp):
    """20 windows of pushes: after the window fills, no push refactorises (every one is an O(m^2)
    update), and every push_ihvp matches the dense inverse of the gradients held."""
    calls = count_refactorisations(monkeypatch)
    grads = awkward_stream(20 * window, d, seed=d + window)
    win = SlidingWindowFisherInverse(d, window, damp, dtype=torch.float64)
    for t, g in enumerate(grads):
        out = win.push_ihvp(g)
        fisher = dense_fisher(grads[max(0, t + 1 - window): t + 1], damp)
        if t % 7 == 0 or t == len(grads) - 1:
            expected = solve(fisher, g)
            if float(expected.norm()) > 0:
                assert rel_err(out, expected) <= tolerance(fisher, torch.float64), t
    assert len(calls) <= window + 2, f"{len(calls)} refactorisations in {len(grads)} pushes"
    x = torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert rel_err(win.ihvp(x), solve(fisher, x)) <= tolerance(fisher, torch.float64)


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(d=st.integers(2, 24), window=st.integers(1, 12), exponent=st.floats(-8, 2), seed=st.integers(0, 2**30),
       data=st.data())
def test_updated_window_is_backward_stable_on_any_stream(d, window, exponent, seed, data):
    """Hypothesis: streams of random, repeated, zero, collinear and combined rows at scales
    10^-6..10^6, several times the window long, with a float32 window (the optimizer's), saved and
    loaded half way (the loaded factor is checked against the Gram matrix, and continues bitwise)."""
    damp = 10.0 ** exponent
    rows = data.draw(gradient_rows(d, 4 * window + 3, seed))
    win = SlidingWindowFisherInverse(d, window, damp, dtype=torch.float32)
    for t, g in enumerate(rows):
        if t == len(rows) // 2:
            restored = SlidingWindowFisherInverse(d, window, damp, dtype=torch.float32)
            restored.load_state_dict(win.state_dict())
            assert torch.equal(restored.push_ihvp(g.float()), win.push_ihvp(g.float()))
            win = restored
            continue
        out = win.push_ihvp(g.float())
        held = rows[max(0, t + 1 - window): t + 1].float().double()
        fisher = dense_fisher(held, damp)
        assert torch.isfinite(out).all()
        tol = tolerance(fisher, torch.float32)
        if tol < 1 and float(g.norm()) > 0:  # else cond(F) is beyond what float32 resolves
            assert rel_err(out, solve(fisher, g.float().double())) <= tol, t


@pytest.mark.parametrize("how", ["drifted", "no kernel"])
def test_a_factor_that_cannot_be_updated_is_refactorised(monkeypatch, how):
    """When the probe says the updated factor drifted (tolerance 0 here), or the
    kernel is unavailable, every full push refactorises and the results are those of the dense inverse."""
    if how == "drifted":
        monkeypatch.setattr(woodbury, "drift_tolerance", lambda size: 0.0)
    else:
        monkeypatch.setattr(kernels, "factor_shift", lambda *args, **kwargs: None)
    calls = count_refactorisations(monkeypatch)
    d, window, damp = 30, 5, 1e-4
    grads = awkward_stream(6 * window, d, seed=2)
    win = SlidingWindowFisherInverse(d, window, damp, dtype=torch.float64)
    for t, g in enumerate(grads):
        out = win.push_ihvp(g)
        fisher = dense_fisher(grads[max(0, t + 1 - window): t + 1], damp)
        if float(g.norm()) > 0:
            assert rel_err(out, solve(fisher, g)) <= tolerance(fisher, torch.float64), t
    assert len(calls) == len(grads)


@needs_kernel
@pytest.mark.parametrize("m", [2, 3, 17, 130])
def test_factor_shift_kernel_matches_a_fresh_cholesky(m):
    gen = torch.Generator().manual_seed(m)
    grads = torch.randn(m + 1, 3 * m, generator=gen, dtype=torch.float64)
    grads[1] *= 1e-5
    grads[-1] *= 1e4
    old = grads[:m] @ grads[:m].T + 1e-3 * torch.eye(m, dtype=torch.float64)
    new = grads[1:] @ grads[1:].T + 1e-3 * torch.eye(m, dtype=torch.float64)
    upper = torch.linalg.cholesky(old, upper=True).contiguous()
    before = upper.clone()
    z = torch.randn(m, generator=gen, dtype=torch.float64)
    v = torch.randn(m, generator=gen, dtype=torch.float64)
    got, product, old_times_v = kernels.factor_shift(upper, new[-1, :-1].contiguous(), float(new[-1, -1]), z, old, v)
    assert torch.allclose(product, got.T @ (got @ z), rtol=1e-12, atol=0)
    assert torch.allclose(old_times_v, old @ v, rtol=1e-12, atol=1e-12 * float(old.abs().max() * v.abs().max()))
    alone = kernels.factor_shift(upper, new[-1, :-1].contiguous(), float(new[-1, -1]))
    assert alone[1] is None and alone[2] is None and torch.equal(alone[0], got)  # the same factor either way
    assert torch.equal(upper, before)  # the old factor is left as it was (a staged push may be dropped)
    assert torch.equal(got, got.triu()) and bool((got.diagonal() > 0).all())  # zero below the diagonal
    assert float((got.T @ got - new).norm() / new.norm()) <= 50 * m * torch.finfo(torch.float64).eps
    # a column that makes the new matrix indefinite is refused, not factored
    assert kernels.factor_shift(upper, new[-1, :-1].contiguous(), -1.0) is None


def test_factor_shift_declines_what_it_cannot_run():
    upper = torch.eye(4, dtype=torch.float64)
    assert kernels.factor_shift(upper.float(), torch.zeros(3), 1.0) is None
    strided = torch.zeros(4, 8, dtype=torch.float64)[:, :4]
    strided.diagonal().fill_(1.0)
    assert kernels.factor_shift(strided, torch.zeros(3, dtype=torch.float64), 1.0) is None
    assert kernels.factor_shift(torch.ones(1, 1, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), 1.0) is None
    column = torch.zeros(3, dtype=torch.float64)
    assert kernels.factor_shift(upper, column, 1.0, None, torch.eye(3, dtype=torch.float64), column) is None  # S of another size


def filled(d=12, window=4, pushes=11, dtype=torch.float64):
    win = SlidingWindowFisherInverse(d, window, 1e-3, dtype=dtype)
    for g in awkward_stream(pushes, d, seed=9).to(dtype):
        win.push(g)
    return win


def test_the_factor_is_saved_so_a_resumed_window_continues_bitwise():
    original = filled()
    state = original.state_dict()
    assert state["factor"].shape == (4, 4) and torch.equal(state["factor"], state["factor"].triu())
    restored = SlidingWindowFisherInverse(12, 4, 1e-3, dtype=torch.float64)
    restored.load_state_dict(state)
    for g in awkward_stream(9, 12, seed=10):
        assert torch.equal(original.push_ihvp(g), restored.push_ihvp(g))


def test_a_state_without_factor_is_refactorised_on_load():
    """States written before the factor was saved still load, with a fresh factorisation."""
    original = filled()
    state = {key: value for key, value in original.state_dict().items() if key != "factor"}
    restored = SlidingWindowFisherInverse(12, 4, 1e-3, dtype=torch.float64)
    restored.load_state_dict(state)
    x = torch.randn(12, dtype=torch.float64)
    assert rel_err(restored.ihvp(x), original.ihvp(x)) <= 1e-12


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.T.contiguous(), "upper triangular"),
    (lambda f: f * torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=torch.float64)[:, None], "diagonal entry <= 0"),
    (lambda f: f * 1.01, "not one of the saved Gram matrix"),
    (lambda f: filled(pushes=12).state_dict()["factor"], "not one of the saved Gram matrix"),  # another state's
])
def test_an_edited_factor_is_refused_and_nothing_changes(edit, message):
    source, target = filled(), filled(pushes=6)
    state = source.state_dict()
    before = target.state_dict()
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(dict(state, factor=edit(state["factor"])))
    after = target.state_dict()
    assert all(torch.equal(after[k], v) if isinstance(v, torch.Tensor) else after[k] == v for k, v in before.items())
