"""MFAC's state: a corrupted state is refused and changes nothing; a state saved before the first
step resets a stepped optimizer; a saved state loads with ``weights_only=True``."""

import pytest
import torch

from conftest import assert_same, snapshot
from mfac import MFAC
from mfac import checkpoint
from mfac.models import mlp


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
