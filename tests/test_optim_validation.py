"""MFAC at the edges of its numbers: settings that cannot work are refused at construction, an
overflowing gradient is skipped with a warning that says why, and a step that would make the
parameters or the learning rate non-finite is refused before anything changes."""

import copy

import pytest
import torch

from conftest import assert_same, snapshot
from mfac import MFAC
from mfac.models import mlp


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


def test_numpy_and_one_element_tensor_hyperparameters_are_numbers():
    import numpy as np

    torch.manual_seed(0)
    reference, other = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(6))
    other.data.copy_(reference.data)
    plain = MFAC([reference], lr=1e-2, window=3, damp=1e-2, momentum=0.5, weight_decay=1e-3)
    given = MFAC([other], lr=np.float64(1e-2), window=3, damp=1e-2,
                 momentum=torch.tensor(0.5, dtype=torch.float64), weight_decay=np.float64(1e-3))
    for _ in range(4):
        grad = torch.randn(6)
        reference.grad, other.grad = grad.clone(), grad.clone()
        plain.step()
        given.step()
    assert torch.equal(reference, other)
    MFAC([torch.nn.Parameter(torch.randn(3))], lr=np.float32(1e-3), momentum=np.float32(0.9))  # accepted
    with pytest.raises(ValueError, match="lr must be a finite number"):
        MFAC([torch.nn.Parameter(torch.randn(3))], lr=np.float32("nan"))
