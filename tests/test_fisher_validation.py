"""Bad input gets a clear error naming the argument, and never changes an object's state.

Also the window's saved states (every corruption refused before anything changes; states of the
previous release still load) and numbers at the edges of the dtype (large finite gradients are
handled; gradients whose products overflow are refused, saying so).
"""

import pytest
import torch

from conftest import assert_same, snapshot
from mfac.fisher import (BlockFisherInverse, DenseFisherInverse, NonFiniteGradientError, SlidingWindowFisherInverse,
                         StaticFisherInverse)

GOOD = torch.randn(4, 10)
BUILDERS = {
    "dense": lambda g, damp=1e-2: DenseFisherInverse(g, damp),
    "static": lambda g, damp=1e-2: StaticFisherInverse(g, damp),
    "block": lambda g, damp=1e-2: BlockFisherInverse(g, damp, 3),
}


@pytest.mark.parametrize("name", BUILDERS)
def test_gradient_matrix_checks(name):
    build = BUILDERS[name]
    with pytest.raises(ValueError, match=r"grads must have shape \(m, d\)"):
        build(torch.randn(10))
    with pytest.raises(ValueError, match="grads"):
        build(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="grads must have a floating dtype"):
        build(torch.ones(4, 10, dtype=torch.int64))
    with pytest.raises(TypeError, match="grads must be a torch.Tensor"):
        build([[1.0, 2.0]])
    for bad in (float("nan"), float("inf")):
        poisoned = GOOD.clone()
        poisoned[1, 2] = bad
        with pytest.raises(ValueError, match="grads contains NaN or Inf"):
            build(poisoned)


@pytest.mark.parametrize("name", BUILDERS)
@pytest.mark.parametrize("damp", [0.0, -1e-3, float("nan"), float("inf")])
def test_damp_must_be_positive_and_finite(name, damp):
    with pytest.raises(ValueError, match="damp"):
        BUILDERS[name](GOOD, damp)


@pytest.mark.parametrize("name", BUILDERS)
def test_damp_type(name):
    with pytest.raises(TypeError, match="damp"):
        BUILDERS[name](GOOD, "1e-3")


@pytest.mark.parametrize("name", BUILDERS)
def test_query_checks(name):
    obj = BUILDERS[name](GOOD)
    with pytest.raises(ValueError, match=r"x must have shape \(10,\) or \(k, 10\)"):
        obj.ihvp(torch.randn(11))
    with pytest.raises(ValueError, match="x must have shape"):
        obj.ihvp(torch.randn(2, 3, 10))
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        obj.ihvp(torch.ones(10, dtype=torch.int32))
    with pytest.raises(IndexError, match="j has entries outside"):
        obj.column(10)
    with pytest.raises(IndexError, match="i has entries outside"):
        obj.element(-1, 0)
    with pytest.raises(ValueError, match="same shape"):
        obj.element(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(TypeError, match="integer"):
        obj.element(torch.tensor([0.5]), torch.tensor([0]))


def test_block_size_checks():
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises(ValueError, match="block_size must be an int >= 1"):
            BlockFisherInverse(GOOD, 1e-2, bad)


def test_window_constructor_checks():
    with pytest.raises(ValueError, match="dim must be an int >= 1"):
        SlidingWindowFisherInverse(0, 4, 1e-2)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        SlidingWindowFisherInverse(10, 0, 1e-2)
    with pytest.raises(ValueError, match="damp"):
        SlidingWindowFisherInverse(10, 4, 0.0)
    with pytest.raises(TypeError, match="dtype must have a floating dtype"):
        SlidingWindowFisherInverse(10, 4, 1e-2, dtype=torch.int64)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        SlidingWindowFisherInverse(10, 4, 1e-2, dtype="float32")
    with pytest.raises(ValueError, match="smallest normal"):
        SlidingWindowFisherInverse(10, 4, 1e-39)


def test_window_push_checks_leave_state_unchanged():
    win = SlidingWindowFisherInverse(10, 4, 1e-2)
    win.push(torch.randn(10))
    before = win.state_dict()
    with pytest.raises(ValueError, match=r"g must have shape \(10,\)"):
        win.push(torch.randn(9))
    with pytest.raises(ValueError, match=r"g must have shape \(10,\)"):
        win.push(torch.randn(1, 10))
    with pytest.raises(TypeError, match="g must have a floating dtype"):
        win.push(torch.ones(10, dtype=torch.int64))
    with pytest.raises(TypeError, match="g must be a torch.Tensor"):
        win.push_ihvp([0.0] * 10)
    after = win.state_dict()
    assert after["pushed"] == before["pushed"] == 1
    assert torch.equal(after["grads"], before["grads"]) and torch.equal(after["gram"], before["gram"])


# Window states ------------------------------------------------------------------------------------

def filled_window(dtype=torch.float32):
    window = SlidingWindowFisherInverse(10, 4, 1e-2, dtype=dtype)
    window.extend(torch.randn(6, 10, generator=torch.Generator().manual_seed(0)).to(dtype))
    return window


def window_corruptions(state):
    yield "gram shape", dict(state, gram=state["gram"][:3, :3])
    yield "grads shape", dict(state, grads=state["grads"][0])
    yield "pushed", dict(state, pushed=-3)
    yield "pushed type", dict(state, pushed=2.5)
    yield "pushed too small", dict(state, pushed=1)  # rows beyond the one it implies
    yield "nan", dict(state, grads=state["grads"].clone().index_fill_(1, torch.tensor([2]), float("nan")))
    yield "gram/grads mismatch", dict(state, grads=state["grads"] * 2)
    yield "asymmetric", dict(state, gram=state["gram"] + torch.triu(torch.ones(4, 4, dtype=torch.float64), 1))
    yield "missing key", {k: v for k, v in state.items() if k != "gram"}
    yield "unknown key", dict(state, surprise=1)
    yield "dtype", dict(state, grads=state["grads"].double())
    yield "damp", dict(state, damp=1.0)
    yield "window", dict(state, window=10**8)
    yield "not a dict", [1, 2, 3]


def test_window_load_refuses_corruptions_and_changes_nothing():
    window = filled_window()
    good = window.state_dict()
    target = SlidingWindowFisherInverse(10, 4, 1e-2)
    target.push(torch.ones(10))
    before = snapshot(target)
    for label, bad in window_corruptions(good):
        with pytest.raises(ValueError) as info:
            target.load_state_dict(bad)
        assert "window state" in str(info.value), label
        assert_same(before, snapshot(target), label)
    target.load_state_dict(good)  # and the good one loads
    x = torch.randn(10)
    assert torch.equal(target.ihvp(x), window.ihvp(x))


def test_window_state_of_previous_release_still_loads():
    window = filled_window()
    legacy = dict(window.state_dict(), inverse=torch.zeros(4, 4, dtype=torch.float64), since_refactor=0,
                  refactor_every=4)
    restored = SlidingWindowFisherInverse(10, 4, 1e-2)
    restored.load_state_dict(legacy)
    assert restored.pushed == window.pushed


# Numbers at the edges of the dtype -------------------------------------------------------------

def test_large_finite_gradients_are_handled_not_called_nan():
    window = SlidingWindowFisherInverse(5, 3, 1e-2)
    g = torch.full((5,), 1e18)  # squared norm 5e36: still a float32 number
    out = window.push_ihvp(g)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), g.double() / (1e-2 + 5e36), rtol=1e-5)


def test_gradients_too_large_for_the_dtype_are_refused_with_what_they_are():
    window = SlidingWindowFisherInverse(5, 3, 1e-2)
    window.push(torch.ones(5))
    before = snapshot(window)
    with pytest.raises(NonFiniteGradientError, match="finite but too large.*norm 2.24e\\+20"):
        window.push_ihvp(torch.full((5,), 1e20))
    assert_same(before, snapshot(window))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_device_mismatch_is_named():
    obj = StaticFisherInverse(GOOD.cuda(), 1e-2)
    with pytest.raises(ValueError, match="x is on cpu"):
        obj.ihvp(torch.randn(10))


def test_import_has_no_global_side_effects():
    import subprocess
    import sys

    code = ("import torch; before = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision(), "
            "torch.get_default_dtype()); import logging; handlers = len(logging.getLogger().handlers); import mfac; "
            "after = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision(), "
            "torch.get_default_dtype()); assert before == after; assert len(logging.getLogger().handlers) == handlers")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


# Self-consistency: the Gram matrix must be the one of the rows ---------------------------------------

def window_forms(dim):
    from mfac.fisher import CompressedWindowFisherInverse

    block = max(1, dim // 3)
    return {
        "float32": lambda: SlidingWindowFisherInverse(dim, 4, 1e-3),
        "float64": lambda: SlidingWindowFisherInverse(dim, 4, 1e-3, dtype=torch.float64),
        "bfloat16": lambda: SlidingWindowFisherInverse(dim, 4, 1e-3, dtype=torch.bfloat16),
        "float16": lambda: SlidingWindowFisherInverse(dim, 4, 1e-3, dtype=torch.float16),
        "compressed": lambda: CompressedWindowFisherInverse(dim, 4, 1e-3, 0.3, block=block),
        "compressed bfloat16": lambda: CompressedWindowFisherInverse(dim, 4, 1e-3, 0.3, dtype=torch.bfloat16,
                                                                     block=block),
    }


def streamed(make, dim, spread, seed=0):
    """A window fed correlated gradients (a common direction plus ``spread`` of noise), by extend and push."""
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(dim, generator=gen) + spread * torch.randn(7, dim, generator=gen)
    window = make()
    window.extend(grads[:4])
    for g in grads[4:]:
        window.push(g)
    return window


def shifted_by(window, gram, x):
    """F^-1 x in float64 as a window whose rows are ``window``'s but whose Gram matrix is ``gram``."""
    rows, k, damp = window.rows(), window.num_grads, window.damp
    inner = k * damp * torch.eye(k, dtype=torch.float64) + gram[:k, :k]
    return (x - rows.T @ torch.linalg.solve(inner, rows @ x)) / damp


@pytest.mark.parametrize("form", list(window_forms(1)))
def test_an_edited_gram_entry_that_shifts_the_inverse_by_one_percent_is_refused(form):
    """A symmetric edit of one off-diagonal Gram entry keeps every other check happy (symmetric,
    diagonal intact) but moves F^-1 x by 1%: the probe check refuses it, for every storage form."""
    dim = 60
    make = window_forms(dim)[form]
    window = streamed(make, dim, 0.1)
    state = window.state_dict()
    x = torch.randn(dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    exact = shifted_by(window, state["gram"], x)
    low, high = 0.0, float(state["gram"][0, 0].sqrt() * state["gram"][1, 1].sqrt())
    for _ in range(60):  # the smallest edit of S[0, 1] that moves F^-1 x by 1%
        middle = (low + high) / 2
        edited = state["gram"].clone()
        edited[0, 1] += middle
        edited[1, 0] += middle
        shift = float((shifted_by(window, edited, x) - exact).norm() / exact.norm())
        low, high = (middle, high) if shift < 0.01 else (low, middle)
    edited = state["gram"].clone()
    edited[0, 1] += high
    edited[1, 0] += high
    target = make()
    before = snapshot(target)
    with pytest.raises(ValueError, match="window state's gram does not match its rows: row [01]"):
        target.load_state_dict(dict(state, gram=edited))
    assert_same(before, snapshot(target))
    target.load_state_dict(state)  # the genuine state loads and answers as the saved window
    assert torch.equal(target.ihvp(x.float()), window.ihvp(x.float()))


@pytest.mark.parametrize("dim, spread", [(7, 1.0), (3000, 0.01), (40_000, 1.0)])
@pytest.mark.parametrize("form", list(window_forms(1)))
def test_every_genuine_state_passes_the_gram_check(form, dim, spread):
    make = window_forms(dim)[form]
    window = streamed(make, dim, spread)
    restored = make()
    restored.load_state_dict(window.state_dict())
    assert restored.pushed == window.pushed


def test_gram_from_another_state_is_refused():
    window, other = streamed(window_forms(50)["float32"], 50, 1.0), streamed(window_forms(50)["float32"], 50, 1.0, 1)
    mixed = dict(window.state_dict(), gram=other.state_dict()["gram"])
    with pytest.raises(ValueError, match="gram does not match its rows"):
        SlidingWindowFisherInverse(50, 4, 1e-3).load_state_dict(mixed)


def test_float16_overflow_is_not_called_nan():
    """A finite gradient beyond float16's range: the message says so, not "NaN or Inf"."""
    window = SlidingWindowFisherInverse(5, 3, 1e-2, dtype=torch.float16)
    before = snapshot(window)
    with pytest.raises(NonFiniteGradientError) as info:
        window.push(torch.full((5,), 1e5))
    assert_same(before, snapshot(window))
    assert "NaN or Inf" not in str(info.value) and "float16" in str(info.value)
