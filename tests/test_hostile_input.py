"""Hostile files, corrupted states, extreme numbers and impossible sizes: refused clearly, and
nothing changes when something is refused."""

import copy
import os

import pytest
import torch

from mfac import MFAC, SlidingWindowFisherInverse
from mfac import checkpoint
from mfac.data import batches
from mfac.fisher import BlockFisherInverse, NonFiniteGradientError
from mfac.models import load_checkpoint, mlp
from mfac.prune import GradualPruner, Masks
from mfac.resources import InsufficientMemoryError


def snapshot(obj) -> dict:
    """A deep, comparable copy of an object's state_dict."""
    return copy.deepcopy(obj.state_dict())


def assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


# Files that try to run code ----------------------------------------------------------------------

class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_file(tmp_path, payload_factory):
    marker = tmp_path / "pwned"
    _RunsCode.marker = marker
    path = tmp_path / "evil.pt"
    torch.save(payload_factory(_RunsCode()), path)
    return path, marker


@pytest.mark.parametrize("payload", [lambda evil: evil, lambda evil: {"state_dict": {"w": evil}},
                                     lambda evil: {"weight": torch.zeros(2), "extra": evil}])
def test_malicious_checkpoint_runs_nothing(tmp_path, payload):
    path, marker = malicious_file(tmp_path, payload)
    for load in (lambda: checkpoint.load(path), lambda: checkpoint.load_weights(path),
                 lambda: load_checkpoint(mlp(64, (8,)), path)):
        with pytest.raises(checkpoint.UnsafeFileError, match="asks to load the Python object .*system.*could run code"):
            load()
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"hello, this is text\n", b"\x00" * 64, os.urandom(4096)])
def test_garbage_files_are_named_corrupt(tmp_path, content):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(checkpoint.CorruptFileError, match="not a readable"):
        checkpoint.load_weights(path)


def test_truncated_file_is_named_corrupt(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(mlp(64, (8,)).state_dict(), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(checkpoint.CorruptFileError, match="truncated|not a readable"):
        checkpoint.load_weights(path)


def test_safetensors_weights_round_trip_and_load_into_models(tmp_path):
    pytest.importorskip("safetensors")
    model = mlp(64, (8,))
    checkpoint.save_weights(model.state_dict(), tmp_path / "w.safetensors")
    other = mlp(64, (8,))
    load_checkpoint(other, tmp_path / "w.safetensors")
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    # A torch file of the same weights loads too.
    torch.save(model.state_dict(), tmp_path / "w.pt")
    assert set(checkpoint.load_weights(tmp_path / "w.pt")) == set(model.state_dict())


def test_atomic_save_keeps_the_old_file_when_interrupted(tmp_path):
    path = tmp_path / "state.pt"
    checkpoint.save({"step": 1, "x": torch.ones(3)}, path)

    class Boom:
        def __reduce__(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"step": 2, "bad": Boom()}, path)
    assert checkpoint.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary left behind


# Batches ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, -1, 11, 2.5, True])
def test_batches_refuse_impossible_sizes_instead_of_hanging(size):
    with pytest.raises(ValueError, match=r"batch_size must be an int in \[1, 10\]"):
        batches(torch.zeros(10, 2), torch.zeros(10), size)


# Window states -----------------------------------------------------------------------------------

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


# Optimizer states --------------------------------------------------------------------------------

def trained_optimizer(steps=5, momentum=0.9):
    torch.manual_seed(0)
    model = mlp(8, (6,), 3)
    opt = MFAC(model.parameters(), lr=1e-2, window=4, damp=1e-2, momentum=momentum)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 8)).sum().backward()
        opt.step()
    return model, opt


def mfac_corruptions(state):
    extra = state["mfac"]
    yield "no momentum key", dict(state, mfac={k: v for k, v in extra.items() if k != "momentum"})
    yield "float16 momentum", dict(state, mfac=dict(extra, momentum=extra["momentum"].half()))
    yield "short momentum", dict(state, mfac=dict(extra, momentum=extra["momentum"][:-1]))
    yield "nan momentum", dict(state, mfac=dict(extra, momentum=extra["momentum"] * float("nan")))
    yield "bad window", dict(state, mfac=dict(extra, window=dict(extra["window"], pushed=-1)))
    yield "huge window", dict(state, mfac=dict(extra, window=dict(extra["window"], window=10**8)))
    yield "dtype string", dict(state, mfac=dict(extra, window=dict(extra["window"], storage_dtype="torch.nonsense")))
    yield "steps", dict(state, mfac=dict(extra, steps=-1))
    yield "dim", dict(state, mfac=dict(extra, dim=3))
    yield "steps without window", dict(state, mfac=dict(extra, window=None))
    yield "no mfac", {k: v for k, v in state.items() if k != "mfac"}
    yield "bad groups", dict(state, param_groups=state["param_groups"] * 2)
    yield "bad lr", dict(state, param_groups=[dict(g, lr=float("nan")) for g in state["param_groups"]])


def test_mfac_load_refuses_corruptions_and_changes_nothing():
    _, source = trained_optimizer()
    good = source.state_dict()
    model, target = trained_optimizer(steps=2)
    before = snapshot(target)
    for label, bad in mfac_corruptions(good):
        with pytest.raises(ValueError):
            target.load_state_dict(bad)
        assert_same(before, snapshot(target), label)
    target.load_state_dict(good)
    assert target.steps == 5


def test_mfac_state_saved_before_first_step_resets_a_stepped_optimizer():
    model = mlp(8, (6,), 3)
    fresh_state = MFAC(model.parameters(), lr=1e-2, window=4, damp=1e-2).state_dict()
    _, stepped = trained_optimizer(momentum=0.0)
    stepped.load_state_dict(fresh_state)
    assert stepped.fisher is None and stepped.steps == 0


def test_mfac_state_loads_with_weights_only(tmp_path):
    _, opt = trained_optimizer()
    checkpoint.save(opt.state_dict(), tmp_path / "opt.pt")
    state = torch.load(tmp_path / "opt.pt", weights_only=True)
    _, other = trained_optimizer(steps=1)
    other.load_state_dict(state)
    assert other.steps == opt.steps


def test_masks_and_pruner_loads_validate_first():
    model = mlp(8, (6,), 3)
    pruner = GradualPruner(model, 0.5, start_step=1, end_step=2, every=1, method="magnitude")
    pruner.step()
    state = pruner.state_dict()
    before = snapshot(pruner)
    bad_states = [
        dict(state, step=-1),
        dict(state, masks={**state["masks"], "0.weight": torch.ones(3, 3, dtype=torch.bool)}),
        dict(state, masks={**state["masks"], "0.weight": state["masks"]["0.weight"].float()}),
        dict(state, masks={"nope.weight": torch.ones(2, dtype=torch.bool)}),
        dict(state, schedule=dict(state["schedule"], final_sparsity=0.9)),
        {"masks": state["masks"]},
    ]
    for bad in bad_states:
        with pytest.raises(ValueError):
            pruner.load_state_dict(bad)
        assert_same(before, snapshot(pruner))
    masks = Masks(state["masks"])
    with pytest.raises(ValueError, match="shape"):
        masks.load_state_dict({**state["masks"], "0.weight": torch.ones(2, dtype=torch.bool)})
    assert_same(Masks(state["masks"]).state_dict(), masks.state_dict())


# Numbers at the edges ----------------------------------------------------------------------------

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


def test_mfac_skips_an_overflowing_gradient_and_says_why():
    model = mlp(4, (3,), 2)
    opt = MFAC(model.parameters(), lr=1e-2, window=3, damp=1e-2)
    before = copy.deepcopy(model.state_dict())
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e20)
    with pytest.warns(RuntimeWarning, match="too large for torch.float32"):
        opt.step()
    assert opt.skipped_steps == 1 and opt.fisher.pushed == 0
    assert_same(before, model.state_dict())


def test_mfac_refuses_settings_that_cannot_work_at_construction():
    params = mlp(4, (3,), 2).parameters
    with pytest.raises(ValueError, match="smallest normal"):
        MFAC(params(), damp=1e-39)
    with pytest.raises(ValueError, match="lr must be a finite number"):
        MFAC(params(), lr=1e300)
    with pytest.raises(ValueError, match="lr must be a finite number"):
        MFAC(params(), lr=float("nan"))


def test_mfac_step_that_would_overflow_parameters_changes_nothing():
    model = mlp(4, (3,), 2)
    opt = MFAC(model.parameters(), lr=1e-2, window=3, damp=1e-30, momentum=0.5, nonfinite="raise")
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    opt.param_groups[0]["lr"] = 3e38
    before_params, before_opt = copy.deepcopy(model.state_dict()), snapshot(opt)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    with pytest.raises(FloatingPointError, match="non-finite|NaN or Inf"):
        opt.step()
    assert_same(before_params, model.state_dict())
    assert_same(before_opt, snapshot(opt))


def test_scheduler_set_nan_lr_is_refused_before_the_step():
    model = mlp(4, (3,), 2)
    opt = MFAC(model.parameters(), lr=1e-2, window=3, damp=1e-2)
    opt.param_groups[0]["lr"] = float("nan")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert opt.fisher is None or opt.fisher.pushed == 0


# Impossible sizes --------------------------------------------------------------------------------

def test_impossible_window_is_refused_before_allocating():
    with pytest.raises(InsufficientMemoryError, match=r"needs .* TB but only .* available.*lower window"):
        SlidingWindowFisherInverse(10**9, 10**5, 1e-2)
    with pytest.raises(MemoryError, match="lower window"):
        MFAC([torch.nn.Parameter(torch.zeros(10**6))], window=10**7)


def test_block_inverse_and_gradient_matrix_are_checked_against_available_memory(monkeypatch):
    from mfac import resources
    from mfac.grads import collect_gradients

    grads = torch.randn(64, 4000)  # block factors of 4000 x 64 numbers plus float64 work: over 1 MB
    monkeypatch.setattr(resources, "available_bytes", lambda device: 1_000_000)
    with pytest.raises(InsufficientMemoryError, match="block_size"):
        BlockFisherInverse(grads, 1e-2, 128)
    model = mlp(64, (64,))
    data = iter([(torch.randn(4, 64), torch.zeros(4, dtype=torch.long))] * 100)
    with pytest.raises(InsufficientMemoryError, match="num_grads"):
        collect_gradients(model, dict(model.named_parameters()), data, torch.nn.functional.cross_entropy,
                          num_grads=100)
    monkeypatch.setattr(resources, "available_bytes", lambda device: None)  # unknown: no refusal
    assert BlockFisherInverse(grads, 1e-2, 128).dim == 4000
