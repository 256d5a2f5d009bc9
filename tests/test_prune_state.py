"""The pruners' state: GradualPruner and Masks validate a state completely before loading it, and a
refused state changes nothing."""

import pytest
import torch

from conftest import assert_same, snapshot
from mfac.models import mlp
from mfac.prune import GradualPruner, Masks


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
