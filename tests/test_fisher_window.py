"""The sliding-window Fisher inverse against the dense inverse of its last `window` gradients."""

import pytest
import torch

from conftest import ALL_DEVICES, dense_fisher, rel_err, solve, tolerance
from mfac import kernels
from mfac.fisher import CompressedWindowFisherInverse, NonFiniteGradientError, SlidingWindowFisherInverse
from test_fisher_static import check_against


def stream(n, d, seed=0, dtype=torch.float64, scales=None):
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if scales is not None:
        grads = grads * scales
    return grads.to(dtype)


@pytest.mark.parametrize("d,window", [(30, 6), (5, 12), (1, 3), (17, 1)])
@pytest.mark.parametrize("damp", [1e-6, 1e-1])
def test_every_push_matches_dense_inverse_of_last_window(d, window, damp):
    grads = stream(5 * window + 3, d)
    win = SlidingWindowFisherInverse(d, window, damp, dtype=torch.float64)
    for t, g in enumerate(grads):
        held = grads[max(0, t + 1 - window): t + 1]
        fisher = dense_fisher(held, damp)
        tol = tolerance(fisher, torch.float64)
        out = win.push_ihvp(g)
        assert win.num_grads == len(held)
        assert rel_err(out, solve(fisher, g)) <= tol, t
    check_against(win, fisher, tol)


@pytest.mark.parametrize("d,window", [(30, 6), (5, 12)])
def test_push_ihvp_of_another_vector(d, window):
    """push_ihvp(g, x) = F^-1 x with g in the window, on both routes (dual d > window, primal d <= window)."""
    grads = stream(2 * window + 3, d, seed=3)
    probes = stream(len(grads), d, seed=4)
    win = SlidingWindowFisherInverse(d, window, 1e-3, dtype=torch.float64)
    for t, (g, x) in enumerate(zip(grads, probes)):
        fisher = dense_fisher(grads[max(0, t + 1 - window): t + 1], 1e-3)
        assert rel_err(win.push_ihvp(g, x), solve(fisher, x)) <= tolerance(fisher, torch.float64), t


@pytest.mark.parametrize("d,window", [(40, 8), (6, 10)])
def test_long_streams_stay_accurate(d, window):
    """40 windows of pushes on an ill-conditioned stream (gradient scales spanning 1e3) still match
    the dense inverse: the Gram matrix is updated entry by entry, so nothing drifts."""
    damp = 1e-4
    scales = torch.logspace(-1.5, 1.5, d, dtype=torch.float64)
    grads = stream(40 * window, d, seed=3, scales=scales)
    win = SlidingWindowFisherInverse(d, window, damp, dtype=torch.float64)
    for g in grads:
        win.push(g)
    held = grads[-window:]
    fisher = dense_fisher(held, damp)
    check_against(win, fisher, tolerance(fisher, torch.float64))


def test_normalises_by_gradients_held_while_filling():
    g = torch.tensor([3.0, 4.0], dtype=torch.float64)
    win = SlidingWindowFisherInverse(2, 100, 0.5, dtype=torch.float64)
    out = win.push_ihvp(g)
    # F = 0.5 I + g g^T (k = 1, not 100): F g = (0.5 + 25) g, so F^-1 g = g / 25.5
    assert torch.allclose(out, g / 25.5, rtol=1e-14, atol=0)


@pytest.mark.parametrize("window", [3, 9])
def test_empty_window_is_scaled_identity(window):
    win = SlidingWindowFisherInverse(4, window, 0.25, dtype=torch.float64)
    x = torch.arange(4, dtype=torch.float64)
    assert win.num_grads == 0
    assert torch.equal(win.ihvp(x), x * 4)
    assert torch.equal(win.diag(), torch.full((4,), 4.0, dtype=torch.float64))
    assert float(win.element(1, 1)) == 4.0 and float(win.element(1, 2)) == 0.0


def test_all_zero_and_duplicate_gradients_give_no_nan():
    d, window, damp = 6, 4, 1e-3
    win = SlidingWindowFisherInverse(d, window, damp, dtype=torch.float64)
    g = torch.randn(d, dtype=torch.float64)
    pushes = [torch.zeros(d, dtype=torch.float64)] * 5 + [g] * 6 + [torch.zeros(d, dtype=torch.float64)] * 3
    for t, x in enumerate(pushes):
        out = win.push_ihvp(x)
        assert torch.isfinite(out).all()
        held = torch.stack(pushes[max(0, t + 1 - window): t + 1])
        fisher = dense_fisher(held, damp)
        check_against(win, fisher, tolerance(fisher, torch.float64))


def test_float32_window_matches_float64_reference():
    d, window, damp = 50, 10, 1e-1
    grads = stream(3 * window, d, dtype=torch.float32) / 7
    win = SlidingWindowFisherInverse(d, window, damp)
    assert win.dtype == win.storage_dtype == torch.float32
    for g in grads:
        out = win.push_ihvp(g)
    fisher = dense_fisher(grads[-window:], damp)
    assert out.dtype == torch.float32
    assert rel_err(out, solve(fisher, grads[-1])) <= 1e-4
    check_against(win, fisher, 1e-4)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
def test_half_precision_window_accumulates_in_float32(storage):
    """The window stores rounded gradients; F is the Fisher of the rounded rows, computed in float32."""
    d, window, damp = 300, 8, 1e-1
    grads = stream(2 * window + 1, d, dtype=torch.float32) / 10
    win = SlidingWindowFisherInverse(d, window, damp, dtype=storage)
    assert (win.storage_dtype, win.dtype) == (storage, torch.float32)
    for g in grads:
        out = win.push_ihvp(g)
    rounded = grads.to(storage).double()
    fisher = dense_fisher(rounded[-window:], damp)
    assert out.dtype == torch.float32
    assert rel_err(out, solve(fisher, rounded[-1])) <= 1e-4
    check_against(win, fisher, 1e-4)


def test_state_dict_round_trip_is_bitwise():
    d, window = 25, 5
    grads = stream(4 * window, d, seed=7, dtype=torch.float32)
    original = SlidingWindowFisherInverse(d, window, 1e-3)
    for g in grads[:7]:
        original.push(g)
    state = original.state_dict()
    restored = SlidingWindowFisherInverse(d, window, 1e-3)
    restored.load_state_dict(state)
    probe = torch.randn(d)
    assert torch.equal(original.ihvp(probe), restored.ihvp(probe))
    for g in grads[7:]:
        assert torch.equal(original.push_ihvp(g), restored.push_ihvp(g))
    assert torch.equal(original.diag(), restored.diag())


def test_state_dict_is_a_snapshot():
    win = SlidingWindowFisherInverse(3, 2, 1e-2)
    win.push(torch.ones(3))
    state = win.state_dict()
    win.push(torch.arange(3.0))
    assert state["pushed"] == 1 and torch.equal(state["grads"][1], torch.zeros(3))


def test_load_state_dict_rejects_mismatches():
    win = SlidingWindowFisherInverse(10, 4, 1e-2)
    win.push(torch.randn(10))
    state = win.state_dict()
    with pytest.raises(ValueError, match="dim"):
        SlidingWindowFisherInverse(11, 4, 1e-2).load_state_dict(state)
    with pytest.raises(ValueError, match="window"):
        SlidingWindowFisherInverse(10, 5, 1e-2).load_state_dict(state)
    with pytest.raises(ValueError, match="storage_dtype"):
        SlidingWindowFisherInverse(10, 4, 1e-2, dtype=torch.float64).load_state_dict(state)
    cast = dict(state, gram=state["gram"].float())
    target = SlidingWindowFisherInverse(10, 4, 1e-2)
    with pytest.raises(ValueError, match="without a change of dtype"):
        target.load_state_dict(cast)
    assert target.num_grads == 0  # a failed load changes nothing
    with pytest.raises(ValueError, match="missing"):
        target.load_state_dict({"dim": 10})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradient_is_rejected_and_window_unchanged(bad):
    win = SlidingWindowFisherInverse(6, 3, 1e-2)
    for g in stream(4, 6, dtype=torch.float32):
        win.push(g)
    before = win.state_dict()
    poisoned = torch.randn(6)
    poisoned[2] = bad
    with pytest.raises(NonFiniteGradientError, match="non-finite|NaN"):  # a ValueError subclass
        win.push_ihvp(poisoned)
    after = win.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]) if isinstance(value, torch.Tensor) else value == after[key], key


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_window_on_device(device):
    d, window, damp = 64, 6, 1e-2
    grads = stream(3 * window, d, seed=5).to(device)
    win = SlidingWindowFisherInverse(d, window, damp, dtype=torch.float64, device=device)
    for g in grads:
        out = win.push_ihvp(g)
    assert out.device.type == device
    check_against(win, dense_fisher(grads[-window:], damp), 1e-9)


@pytest.mark.parametrize("d,window", [(30, 6), (4, 9)])
@pytest.mark.parametrize("held,n", [(0, 3), (2, 6), (4, 20)])
def test_extend_equals_pushing_one_at_a_time(d, window, held, n):
    grads = stream(held + n + 4, d, seed=11)
    one, batch = (SlidingWindowFisherInverse(d, window, 1e-3, dtype=torch.float64) for _ in range(2))
    for g in grads[:held]:
        one.push(g)
        batch.push(g)
    for g in grads[held: held + n]:
        one.push(g)
    batch.extend(grads[held: held + n])
    assert (batch.num_grads, batch.pushed) == (one.num_grads, one.pushed)
    assert torch.equal(batch.state_dict()["grads"], one.state_dict()["grads"])  # same ring positions
    for g in grads[held + n:]:  # and the two keep agreeing afterwards
        assert rel_err(batch.push_ihvp(g), one.push_ihvp(g)) <= 1e-9
    k = min(window, held + n + 4)
    fisher = dense_fisher(grads[-k:], 1e-3)
    check_against(batch, fisher, tolerance(fisher, torch.float64))


def test_extend_rejects_non_finite_batch_whole():
    win = SlidingWindowFisherInverse(5, 3, 1e-2)
    bad = torch.randn(4, 5)
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        win.extend(bad)
    assert win.pushed == 0
    with pytest.raises(ValueError, match=r"shape \(n, 5\)"):
        win.extend(torch.randn(5))


def test_round_off_indefinite_gram_does_not_break_the_window():
    """Identical float32 gradients and a damp far below their scale: the float32 Gram matrix plus
    k*damp*I is indefinite after round-off. Pushing must neither raise nor produce NaN, and the
    window's counters must stay consistent."""
    g = torch.randn(2000, generator=torch.Generator().manual_seed(0))
    win = SlidingWindowFisherInverse(2000, 16, 1e-10)
    for step in range(40):
        out = win.push_ihvp(g)
        assert torch.isfinite(out).all(), step
    assert (win.pushed, win.num_grads) == (40, 16)
    assert torch.isfinite(win.diag()).all()


def test_robust_cholesky_repairs_only_failed_matrices():
    from mfac.fisher.base import robust_cholesky

    good = torch.eye(3, dtype=torch.float64) * 2
    v = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    bad = torch.outer(v, v) - 1e-9 * torch.eye(3, dtype=torch.float64)  # indefinite: eigenvalues 3, -1e-9, -1e-9
    lower = robust_cholesky(torch.stack([good, bad]), floor=1e-6)
    assert torch.equal(lower[0], torch.linalg.cholesky(good))
    rebuilt = lower[1] @ lower[1].T
    eigenvalues = torch.linalg.eigvalsh(rebuilt)
    assert float(eigenvalues.min()) >= 1e-6 * (1 - 1e-6)
    assert torch.allclose(rebuilt, bad, atol=2e-6)
    assert torch.equal(robust_cholesky(good, 1e-6), torch.linalg.cholesky(good))


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key] for key in a)


def assert_refused(window, staged, match: str, x=None) -> None:
    """commit (and, given x, staged_ihvp) refuse ``staged`` with a message matching ``match``, and
    the window's state is bitwise what it was."""
    before = window.state_dict()
    if x is not None:
        with pytest.raises(ValueError, match=match):
            window.staged_ihvp(staged, x)
    with pytest.raises(ValueError, match=match):
        window.commit(staged)
    assert same_state(window.state_dict(), before)


@pytest.mark.parametrize("make", [lambda: SlidingWindowFisherInverse(50, 1, 1e-3),
                                  lambda: CompressedWindowFisherInverse(500, 1, 1e-3, 0.1, block=100)],
                         ids=["dense", "compressed"])
def test_a_staged_push_commits_once(make):
    """A window of one gradient: the push lands in the same slot with the same size every time, so only
    the staged count tells a spent push from a fresh one; committing it again is refused and changes
    nothing (a compressed window would otherwise hand its live residual out as a spare buffer)."""
    window = make()
    staged = window.stage(torch.randn(window.dim, generator=torch.Generator().manual_seed(3)))
    window.commit(staged)
    assert_refused(window, staged, "committed already")


def test_a_push_staged_a_whole_window_ago_is_refused():
    """m pushes later the slot and the size match again, but the push's dots and factor are stale."""
    grads = stream(7, 20)
    window = SlidingWindowFisherInverse(20, 3, 1e-3, dtype=torch.float64)
    for g in grads[:3]:
        window.push(g)
    stale = window.stage(grads[3])
    for g in grads[4:7]:
        window.push(g)
    assert_refused(window, stale, "stage it again")


def test_a_spent_or_stale_push_answers_no_products():
    """staged_ihvp is for a push not yet committed: a spent push's factor storage may already hold
    a later factor (the window reuses it), so the product is refused, not answered from it."""
    grads = stream(4, 20)
    window = SlidingWindowFisherInverse(20, 3, 1e-3, dtype=torch.float64)
    staged = window.stage(grads[0])
    window.commit(staged)
    with pytest.raises(ValueError, match="stage it again"):
        window.staged_ihvp(staged, grads[1])


@pytest.mark.skipif(not kernels.available(), reason=f"compiled kernels: {kernels.status()}")
def test_reused_factor_storage_gives_bitwise_the_same_pushes(monkeypatch):
    """A full window writes each updated factor into the storage of the factor it replaced: results
    and states equal, bit for bit, those of a window that allocates every factor afresh; a dropped
    stage, a refused push, and a load whose state is then overwritten change nothing of that."""
    m, d = 130, 300  # at least woodbury.SMALLEST_UPDATED: pushes update the factor
    grads = torch.randn(m + 40, d, dtype=torch.float64, generator=torch.Generator().manual_seed(21))
    shift = kernels.factor_shift
    reused = []

    def run(reuse: bool):
        monkeypatch.setattr(kernels, "factor_shift", lambda *args, out=None: (
            reused.append(out is not None), shift(*args, out=out if reuse else None))[1])
        window = SlidingWindowFisherInverse(d, m, 1e-2, dtype=torch.float64)
        window.extend(grads[:m])
        results = []
        for n, g in enumerate(grads[m:]):
            if n == 10:
                window.stage(grads[0])  # dropped: its factor's storage is never handed out again
            if n == 20:
                bad = g.clone()
                bad[3] = float("nan")
                with pytest.raises(NonFiniteGradientError):
                    window.push_ihvp(bad)
            if n == 30:
                state = window.state_dict()
                window.load_state_dict(state)
                state["factor"].fill_(float("nan"))  # the window must not hold the caller's tensor
            results.append(window.push_ihvp(g))
        return results, window.state_dict()

    expected, expected_state = run(reuse=False)
    reused.clear()
    got, state = run(reuse=True)
    assert all(torch.equal(a, b) for a, b in zip(got, expected)) and same_state(state, expected_state)
    assert sum(reused) >= 35  # all but the first update, and the first after the dropped stage and the load


@pytest.mark.parametrize("make", [lambda: SlidingWindowFisherInverse(300, 128, 1e-3, dtype=torch.float64),
                                  lambda: CompressedWindowFisherInverse(400, 4, 1e-3, 0.25, block=100)],
                         ids=["dense-updated", "compressed"])
def test_a_spent_push_stays_spent_after_a_load_rewinds_the_window(make):
    """A load may take the window back to the push count a spent push was staged on; the push is
    still refused (its factor's storage, or a compressed window's buffers, hold later pushes now),
    and the window is left as the load made it."""
    window = make()
    grads = torch.randn(window.window + 3, window.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(22))
    grads = grads.to(window.dtype)
    for g in grads[:window.window]:
        window.push(g)
    state = window.state_dict()
    spent = window.stage(grads[window.window])
    window.commit(spent)
    window.push(grads[window.window + 1])
    window.push(grads[window.window + 2])
    window.load_state_dict(state)
    assert_refused(window, spent, "stage it again", x=grads[0])
    assert same_state(window.state_dict(), state)


def test_a_half_precision_window_reuses_its_push_buffers_safely():
    """A bfloat16 window encodes each push into the buffers of the last one it wrote: its results
    equal, bit for bit, those of a window given bfloat16 gradients (which it stores as they are,
    reusing nothing); a spent push's row passed back as g is read, not overwritten; and a g that is
    already bfloat16 is stored, never reused as a buffer."""
    d, m = 300, 4
    grads = torch.randn(14, d, generator=torch.Generator().manual_seed(23))
    reusing = SlidingWindowFisherInverse(d, m, 1e-3, dtype=torch.bfloat16)
    reference = SlidingWindowFisherInverse(d, m, 1e-3, dtype=torch.bfloat16)
    spent, kept = None, None
    for n, g in enumerate(grads):
        if n == 6:
            g = spent.stored  # a spent push's row, which may be a reused buffer now
        if n == 9:
            g = kept = g.to(torch.bfloat16)
        expected = g.to(torch.bfloat16).clone()
        staged = reusing.stage(g)
        got = staged.direction
        reusing.commit(staged)
        assert torch.equal(got, reference.push_ihvp(expected))
        assert torch.equal(g.to(torch.bfloat16), expected)  # g was not written into
        spent = staged
    assert torch.equal(kept, grads[9].to(torch.bfloat16))
    assert same_state(reusing.state_dict(), reference.state_dict())


def test_a_push_staged_on_one_window_is_refused_by_another():
    """Two windows in the same state (fed the same gradients): a push staged on one is refused by the
    other, which is left unchanged (committed on both, they would share the factor's storage)."""
    grads = stream(131, 300)
    first, second = (SlidingWindowFisherInverse(300, 128, 1e-3, dtype=torch.float64) for _ in range(2))
    for window in (first, second):
        window.extend(grads[:128])
        window.push(grads[128])
    staged = first.stage(grads[129])
    assert_refused(second, staged, "another window", x=grads[0])
    first.commit(staged)
