"""MFAC(max_grad_norm=...): the optimizer clips the gradient itself, as Trainer would."""

import math

import pytest
import torch
from torch import nn

from mfac import MFAC
from mfac.defaults import TRANSFORMER_RECIPE


def model_and_batches(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(8, 12, generator=gen) * 5, torch.randint(0, 3, (8,), generator=gen)) for _ in range(12)]
    return model, batches


def train(model, opt, batches, loss_scale=1.0, torch_clip=None):
    norms = []
    for x, y in batches:
        opt.zero_grad()
        (nn.functional.cross_entropy(model(x), y) * loss_scale).backward()
        if torch_clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), torch_clip)))
        opt.step()
    return norms


def test_clipping_in_the_optimizer_matches_clipping_before_it():
    clipped, batches = model_and_batches()
    outside = model_and_batches()[0]
    train(clipped, MFAC(clipped.parameters(), lr=1e-2, window=4, damp=1e-3, max_grad_norm=0.5), batches)
    norms = train(outside, MFAC(outside.parameters(), lr=1e-2, window=4, damp=1e-3), batches, torch_clip=0.5)
    assert max(norms) > 0.5  # the clipping did act
    for a, b in zip(clipped.parameters(), outside.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # torch's clipping adds 1e-6 to the norm


def test_gradients_trainer_already_clipped_are_left_exactly_as_they_are():
    """Inside Trainer (which clips to max_grad_norm first) the optimizer's clipping changes nothing."""
    twice, batches = model_and_batches()
    once = model_and_batches()[0]
    train(twice, MFAC(twice.parameters(), lr=1e-2, window=4, damp=1e-3, max_grad_norm=1.0), batches, torch_clip=1.0)
    train(once, MFAC(once.parameters(), lr=1e-2, window=4, damp=1e-3), batches, torch_clip=1.0)
    for a, b in zip(twice.parameters(), once.parameters()):
        assert torch.equal(a, b)


def test_with_clipping_the_step_does_not_depend_on_the_loss_scale():
    """Gradients above the clipping norm: scaling the loss by 1000 leaves the steps as they were
    (up to rounding), where without clipping it changes them."""
    results = {}
    for clip in (1e-3, None):
        for scale in (1.0, 1000.0):
            model, batches = model_and_batches()
            train(model, MFAC(model.parameters(), lr=1e-2, window=4, damp=1e-3, max_grad_norm=clip), batches[:6],
                  loss_scale=scale)
            results[clip, scale] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(results[1e-3, 1.0], results[1e-3, 1000.0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(results[None, 1.0], results[None, 1000.0], rtol=1e-2)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, math.nan, math.inf, "1", True])
def test_a_clipping_norm_that_cannot_work_is_refused(bad):
    model, _ = model_and_batches()
    with pytest.raises((ValueError, TypeError), match="max_grad_norm"):
        MFAC(model.parameters(), max_grad_norm=bad)


def test_max_grad_norm_is_optimizer_wide():
    model, _ = model_and_batches()
    with pytest.raises(ValueError, match="max_grad_norm is optimizer-wide"):
        MFAC([{"params": model.parameters(), "max_grad_norm": 1.0}])


def test_a_non_finite_gradient_is_still_skipped_with_clipping():
    model, batches = model_and_batches()
    opt = MFAC(model.parameters(), lr=1e-2, window=4, damp=1e-3, max_grad_norm=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    nn.functional.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
    next(model.parameters()).grad[0, 0] = math.inf
    with pytest.warns(RuntimeWarning, match="skipped step 1"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.skipped_steps == 1


def test_the_transformer_recipe_clips():
    assert TRANSFORMER_RECIPE.max_grad_norm == 1.0
    model, _ = model_and_batches()
    opt = MFAC(model.parameters(), **{**TRANSFORMER_RECIPE.kwargs(), "density": 1.0, "window": 4})
    assert opt.max_grad_norm == 1.0
