"""OBS and magnitude pruning: the closed form, exact sparsity, masks, schedules and bad input."""

import pytest
import torch
from torch import nn

from conftest import dense_fisher
from mfac import MFAC
from mfac.grads import collect_gradients, cycle
from mfac.prune import GradualPruner, Masks, prune_oneshot, recalibrate_batchnorm


def regression_batches(n=12, in_features=4, out_features=3, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, in_features, generator=gen, dtype=dtype),
             torch.randn(5, out_features, generator=gen, dtype=dtype)) for _ in range(n)]


def mse(out, target):
    return ((out - target) ** 2).mean()


@pytest.mark.parametrize("sparsity", [1 / 12, 5 / 12])
def test_obs_update_equals_dense_closed_form(sparsity):
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False).double()
    data, damp, m = regression_batches(), 1e-3, 8
    weight = model.weight.detach().reshape(-1).clone()
    grads = collect_gradients(model, {"weight": model.weight}, cycle(data), mse, m)
    finv = torch.linalg.inv(dense_fisher(grads, damp))
    diag = finv.diagonal()
    removed = (weight ** 2 / (2 * diag)).argsort()[: round(sparsity * 12)]
    expected = weight - finv[:, removed] @ (weight[removed] / diag[removed])
    expected[removed] = 0

    masks = prune_oneshot(model, sparsity, data, mse, num_grads=m, damp=damp, block_size="exact", recompute=1)
    assert torch.allclose(model.weight.detach().reshape(-1), expected, rtol=1e-10, atol=1e-12)
    assert set(torch.nonzero(~masks["weight"].reshape(-1)).reshape(-1).tolist()) == set(removed.tolist())


def test_block_obs_uses_block_diagonal_inverse():
    torch.manual_seed(1)
    model = nn.Linear(4, 3, bias=False).double()
    data, damp, m = regression_batches(seed=1), 1e-3, 6
    weight = model.weight.detach().reshape(-1).clone()
    grads = collect_gradients(model, {"weight": model.weight}, cycle(data), mse, m)
    finv = torch.block_diag(*[torch.linalg.inv(dense_fisher(grads[:, s:s + 4], damp)) for s in range(0, 12, 4)])
    diag = finv.diagonal()
    removed = (weight ** 2 / (2 * diag)).argsort()[:6]
    expected = weight - finv[:, removed] @ (weight[removed] / diag[removed])
    expected[removed] = 0
    prune_oneshot(model, 0.5, data, mse, num_grads=m, damp=damp, block_size=4, recompute=1)
    assert torch.allclose(model.weight.detach().reshape(-1), expected, rtol=1e-10, atol=1e-12)


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 10))


def image_batches(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(n)]


@pytest.mark.parametrize("method", ["obs", "magnitude"])
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.77])
def test_sparsity_is_exact_and_other_params_untouched(method, scope, sparsity):
    model = small_net()
    untouched = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith("weight")
                 or n.startswith("1.")}
    masks = prune_oneshot(model, sparsity, image_batches(), nn.functional.cross_entropy, method=method,
                          num_grads=4, recompute=3, scope=scope, damp=1e-4)
    assert set(masks) == {"0.weight", "4.weight", "6.weight"}
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * total) if scope == "global" else True
    if scope == "layer":
        for name, m in masks.items():
            assert int((~m).sum()) == round(sparsity * m.numel()), name
    params = dict(model.named_parameters())
    for name, m in masks.items():
        assert torch.all(params[name][~m] == 0)
    for name, value in untouched.items():
        assert torch.equal(params[name], value), name


@pytest.mark.parametrize("pattern,n,group", [("2:4", 2, 4), ("1:4", 1, 4), ("4:8", 4, 8)])
@pytest.mark.parametrize("method", ["obs", "magnitude"])
def test_n_m_groups(pattern, n, group, method):
    model = nn.Sequential(nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 16))
    data = [(torch.randn(4, 8, 8, 8), torch.randint(0, 16, (4,))) for _ in range(3)]
    masks = prune_oneshot(model, None, data, nn.functional.cross_entropy, method=method, pattern=pattern,
                          num_grads=3, damp=1e-4)
    for name, m in masks.items():
        rows = m.reshape(m.shape[0], -1).reshape(m.shape[0], -1, group)
        assert torch.all((~rows).sum(-1) >= n), name
        assert masks.sparsity(name) == n / group
        weight = dict(model.named_parameters())[name].reshape(m.shape[0], -1).reshape(m.shape[0], -1, group)
        assert torch.all((weight == 0).sum(-1) >= n)


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
                                      lambda p: torch.optim.Adam(p, lr=1e-2),
                                      lambda p: MFAC(p, lr=1e-2, window=4, damp=1e-2, weight_decay=1e-2)])
def test_attached_masks_keep_pruned_weights_zero_through_training(make_opt):
    model = small_net()
    opt = make_opt(model.parameters())  # created before pruning: the parameters stay the same objects
    data = image_batches()
    masks = prune_oneshot(model, 0.6, data, nn.functional.cross_entropy, method="magnitude")
    handle = masks.attach(model)
    before = model[4].weight.detach().clone()
    for x, y in data * 2:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for name, m in masks.items():
            module = model[int(name.split(".")[0])]
            assert torch.all(module.weight[~m] == 0)
    assert not torch.equal(model[4].weight.detach(), before)  # training did change the kept weights
    handle.remove()
    assert set(dict(model.named_parameters())) == {f"{i}.{k}" for i in (0, 1, 4, 6) for k in ("weight", "bias")}
    for name, m in masks.items():
        assert torch.all(dict(model.named_parameters())[name][~m] == 0)


def test_masks_state_dict_and_sparsity():
    masks = Masks({"a.weight": torch.tensor([True, False, False, True]), "b.weight": torch.ones(2, 2, dtype=torch.bool)})
    assert masks.sparsity() == 0.25 and masks.per_tensor_sparsity() == {"a.weight": 0.5, "b.weight": 0.0}
    restored = Masks({})
    restored.load_state_dict(masks.state_dict())
    assert all(torch.equal(restored[k], masks[k]) for k in masks)
    with pytest.raises(TypeError, match="bool tensor"):
        Masks({"a": torch.ones(3)})


def test_mask_shape_mismatch_is_named():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="mask 'weight' has shape"):
        Masks({"weight": torch.ones(3, 3, dtype=torch.bool)}).apply(model)


def test_bad_input_leaves_model_untouched():
    model = small_net()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    data = image_batches()
    loss = nn.functional.cross_entropy
    cases = [
        (dict(sparsity=1.0), "sparsity must be"), (dict(sparsity=-0.1), "sparsity must be"),
        (dict(sparsity=0.5, method="random"), "method must be"), (dict(sparsity=0.5, scope="row"), "scope must be"),
        (dict(sparsity=None, pattern="4:2"), "pattern must be"), (dict(sparsity=None, pattern="2-4"), "pattern must be"),
        (dict(sparsity=None, pattern="3:5"), "divides by 5"), (dict(sparsity=0.3, pattern="2:4"), "contradicts"),
        (dict(sparsity=0.5, data=None), "needs data"), (dict(sparsity=0.5, params=["nope.weight"]), "params"),
        (dict(sparsity=0.5, params=[nn.Parameter(torch.zeros(2))]), "not a parameter"),
        (dict(sparsity=0.5, num_grads=0), "num_grads"), (dict(sparsity=0.5, damp=0.0), "damp"),
        (dict(sparsity=0.5, block_size=0), "block_size"),
    ]
    for kwargs, match in cases:
        kwargs = {"data": data, **kwargs}
        with pytest.raises(ValueError, match=match):
            prune_oneshot(model, loss_fn=loss, **kwargs)
        for name, value in model.state_dict().items():
            assert torch.equal(value, before[name]), (kwargs, name)


def test_failure_midway_restores_weights():
    model = small_net()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    poisoned = image_batches()
    poisoned[1] = (torch.full((8, 1, 8, 8), float("nan")), poisoned[1][1])
    with pytest.raises(ValueError, match="NaN"):
        prune_oneshot(model, 0.5, poisoned, nn.functional.cross_entropy, num_grads=3, recompute=2)
    for name, value in model.named_parameters():
        assert torch.equal(value, before[name])


def test_per_sample_gradients_match_loop():
    model = small_net().eval()
    x, y = image_batches(1)[0]
    params = {"4.weight": model[4].weight, "6.weight": model[6].weight}
    fast = collect_gradients(model, params, cycle([(x, y)]), nn.functional.cross_entropy, 8, per_sample=True)
    for i in range(8):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        slow = torch.cat([model[4].weight.grad.reshape(-1), model[6].weight.grad.reshape(-1)])
        assert torch.allclose(fast[i], slow, atol=1e-6)


def test_gradual_pruner_follows_cubic_schedule_and_checkpoints():
    model = small_net()
    data = image_batches()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = GradualPruner(model, 0.8, start_step=2, end_step=10, every=2, data=data,
                           loss_fn=nn.functional.cross_entropy, num_grads=3, damp=1e-4)
    assert pruner.target_sparsity(1) == 0.0 and pruner.target_sparsity(10) == 0.8
    assert abs(pruner.target_sparsity(6) - 0.8 * (1 - 0.5 ** 3)) < 1e-12
    seen = []
    for step in range(1, 13):
        x, y = data[step % len(data)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        pruned = pruner.step()
        seen.append(round(pruner.sparsity, 3))
        assert pruned == (step in (4, 6, 8, 10))  # at step 2 the target is initial_sparsity = 0
        for name, m in pruner.masks.items():
            assert torch.all(model[int(name.split(".")[0])].weight[~m] == 0)
    assert abs(pruner.sparsity - 0.8) < 1e-3
    assert seen == sorted(seen)
    state = pruner.state_dict()
    other = small_net()
    resumed = GradualPruner(other, 0.8, start_step=2, end_step=10, every=2, method="magnitude")
    resumed.load_state_dict(state)
    assert resumed.current_step == 12 and resumed.sparsity == pruner.sparsity
    assert torch.all(other[4].weight[~pruner.masks["4.weight"]] == 0)


def test_recalibrate_batchnorm_is_the_plain_average():
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3))
    data = image_batches(4)
    model.train()
    used = recalibrate_batchnorm(model, data, num_batches=3)
    assert used == 3 and model.training and model[1].momentum == 0.1
    with torch.no_grad():
        means = torch.stack([model[0](x).mean(dim=(0, 2, 3)) for x, _ in data[:3]])
    assert torch.allclose(model[1].running_mean, means.mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="num_batches"):
        recalibrate_batchnorm(model, data, 0)


def test_obs_beats_magnitude_on_digits_at_90_percent():
    """A real, seeded run: an MLP trained to >= 97% on digits, pruned one-shot to 90% sparsity with
    OBS (default recomputation and settings) keeps >= 93%, at least 20 points above magnitude."""
    import copy

    from mfac.data import load_digits
    from mfac.models import mlp
    from mfac.training import accuracy as accuracy_of, train_classifier

    split = load_digits()
    torch.manual_seed(0)
    model = mlp(64, (64,))
    train_classifier(model, split.train_x, split.train_y, torch.optim.Adam(model.parameters(), lr=3e-3), 800)

    def accuracy(net):
        return accuracy_of(net, split.test_x, split.test_y)

    assert accuracy(model) >= 0.97
    data = [(split.train_x[i:i + 32], split.train_y[i:i + 32]) for i in range(0, len(split.train_x) - 31, 32)]
    magnitude, obs = copy.deepcopy(model), copy.deepcopy(model)
    prune_oneshot(magnitude, 0.9, method="magnitude")
    masks = prune_oneshot(obs, 0.9, data, nn.functional.cross_entropy)
    assert masks.sparsity() == round(0.9 * masks_total(masks)) / masks_total(masks)
    assert accuracy(obs) >= 0.93, accuracy(obs)
    assert accuracy(obs) - accuracy(magnitude) >= 0.20, (accuracy(obs), accuracy(magnitude))


def masks_total(masks):
    return sum(m.numel() for m in masks.values())


@pytest.mark.parametrize("block_size,num_grads", [(8, 16), (64, 16), ("exact", 16)])
def test_relative_damping_makes_obs_invariant_to_the_loss_scale(block_size, num_grads):
    """Scaling the loss by c scales F by c^2; relative damping scales lambda alike, so the masks and
    the corrected weights do not change (an absolute damp would change both)."""
    import copy

    data = image_batches()
    base = small_net()
    pruned = {}
    for scale in (1.0, 1e3):
        model = copy.deepcopy(base)
        masks = prune_oneshot(model, 0.7, data, lambda out, y, s=scale: s * nn.functional.cross_entropy(out, y),
                              num_grads=num_grads, block_size=block_size, recompute=2)
        pruned[scale] = (masks, model)
    for name in pruned[1.0][0]:
        assert torch.equal(pruned[1.0][0][name], pruned[1e3][0][name]), name
    for (n1, p1), (_, p2) in zip(pruned[1.0][1].named_parameters(), pruned[1e3][1].named_parameters()):
        assert torch.allclose(p1, p2, rtol=1e-3, atol=1e-5), n1


def test_damping_arguments_are_checked():
    model = small_net()
    with pytest.raises(ValueError, match="either damp"):
        prune_oneshot(model, 0.5, image_batches(), nn.functional.cross_entropy, damp=1e-3, relative_damp=0.1)
    with pytest.raises(ValueError, match="relative_damp must be a finite number > 0"):
        prune_oneshot(model, 0.5, image_batches(), nn.functional.cross_entropy, relative_damp=-1.0)
    with pytest.raises(ValueError, match="exactly one of loss_fn"):
        prune_oneshot(model, 0.5, image_batches(), nn.functional.cross_entropy, batch_loss=lambda m, b: 0.0)


def test_prune_settings_resolve_defaults_once_and_name_bad_arguments():
    import dataclasses

    from mfac import defaults
    from mfac.prune import PruneSettings

    settings = PruneSettings()
    assert (settings.num_grads, settings.block_size, settings.recompute, settings.damp, settings.relative_damp) == (
        defaults.PRUNE_NUM_GRADS, defaults.PRUNE_BLOCK_SIZE, defaults.PRUNE_RECOMPUTE, None,
        defaults.PRUNE_RELATIVE_DAMP)
    assert PruneSettings(num_grads=None, block_size=None, recompute=None) == settings  # None: the default
    assert PruneSettings(damp=1e-3).relative_damp is None
    exact = PruneSettings(block_size=defaults.EXACT)
    assert exact.exact and not exact.streamed
    assert PruneSettings(num_grads=16, block_size=16).streamed and not PruneSettings(num_grads=16, block_size=17).streamed
    assert PruneSettings(recompute=8).sub_steps((2, 4)) == 2 and PruneSettings(method="magnitude").sub_steps() == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.num_grads = 3
    for kwargs, match in [(dict(block_size=0), "block_size must be .*'exact'"), (dict(block_size="none"), "block_size"),
                          (dict(num_grads=1.5), "num_grads must be an int >= 1, or None for the default 256"),
                          (dict(recompute=0), "recompute"), (dict(per_sample="yes"), "per_sample"),
                          (dict(method="random"), "method"), (dict(scope="row"), "scope")]:
        with pytest.raises(ValueError, match=match):
            PruneSettings(**kwargs)


def test_block_size_none_is_the_default_and_exact_is_spelled_out():
    import copy

    from mfac import defaults

    base, pruned = small_net(), {}
    for block_size in (None, defaults.PRUNE_BLOCK_SIZE, defaults.EXACT):
        model = copy.deepcopy(base)
        masks = prune_oneshot(model, 0.6, image_batches(), nn.functional.cross_entropy, num_grads=8,
                              block_size=block_size, recompute=1)
        pruned[block_size] = (masks, model[4].weight.detach().clone())
    assert all(torch.equal(pruned[None][0][n], pruned[defaults.PRUNE_BLOCK_SIZE][0][n]) for n in pruned[None][0])
    assert torch.equal(pruned[None][1], pruned[defaults.PRUNE_BLOCK_SIZE][1])
    assert not torch.equal(pruned[defaults.EXACT][1], pruned[None][1])  # d > 128: one block differs from blocks


def test_gradual_pruner_checks_its_settings_once_when_built():
    from mfac import defaults
    from mfac.prune import PruneSettings

    model, loss = small_net(), nn.functional.cross_entropy
    pruner = GradualPruner(model, 0.5, 1, 3, 1, data=image_batches(), loss_fn=loss, num_grads=4)
    assert pruner.settings.recompute == defaults.GRADUAL_RECOMPUTE and pruner.settings.num_grads == 4
    assert GradualPruner(model, 0.5, 1, 3, 1, data=image_batches(), loss_fn=loss,
                         recompute=None).settings.recompute == defaults.GRADUAL_RECOMPUTE
    given = PruneSettings(num_grads=4, recompute=2)
    assert GradualPruner(model, 0.5, 1, 3, 1, data=image_batches(), loss_fn=loss, settings=given).settings is given
    with pytest.raises(ValueError, match="block_size"):
        GradualPruner(model, 0.5, 1, 3, 1, data=image_batches(), loss_fn=loss, block_size=0)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['num_grad'\\]"):
        GradualPruner(model, 0.5, 1, 3, 1, data=image_batches(), loss_fn=loss, num_grad=4)
    with pytest.raises(TypeError, match="not both"):
        GradualPruner(model, 0.5, 1, 3, 1, data=image_batches(), loss_fn=loss, settings=given, num_grads=4)
    with pytest.raises(ValueError, match="contradicts settings.method"):
        GradualPruner(model, 0.5, 1, 3, 1, method="magnitude", settings=given)
    with pytest.raises(ValueError, match="needs data"):
        GradualPruner(model, 0.5, 1, 3, 1, loss_fn=loss)


# Gradual structured pruning ------------------------------------------------------------------------------


def digits_mlp_and_batches(seed=0, batches=4):
    from mfac.data import load_digits
    from mfac.models import mlp

    digits = load_digits()
    torch.manual_seed(seed)
    model = mlp(64, (32, 16), 10)
    data = [(digits.train_x[i:i + 32], digits.train_y[i:i + 32]) for i in range(0, 32 * batches, 32)]
    return model, data, digits


@pytest.mark.parametrize("method,scope", [("obs", "global"), ("magnitude", "layer")])
def test_gradual_pruner_removes_whole_neurons_on_its_schedule(method, scope):
    """The bundled MLP on digits: each pruning step removes whole neurons (the producing row and bias,
    the consuming column) to round(target * structures), earlier ones stay removed, the masks stay
    attached so removed neurons are exactly zero after every optimizer step, and the result compacts."""
    from mfac.prune import compact

    model, data, digits = digits_mlp_and_batches()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    pruner = GradualPruner(model, 0.75, start_step=2, end_step=8, every=2, data=data,
                           loss_fn=nn.functional.cross_entropy, method=method, scope=scope, structure="neurons",
                           num_grads=16, block_size=16)
    assert pruner.structured and set(pruner.masks) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight"}
    previous = [torch.zeros(32, dtype=torch.bool), torch.zeros(16, dtype=torch.bool)]
    for step in range(1, 11):
        x, y = data[step % len(data)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.step()
        removed = pruner.removed_structures()
        assert all(torch.all(now[before]) for now, before in zip(removed, previous))  # removed stay removed
        previous = removed
        target = pruner.target_sparsity(max(s for s in (0, 2, 4, 6, 8) if s <= step))
        if scope == "global":
            assert sum(int(r.sum()) for r in removed) == round(target * 48), step
        else:
            assert [int(r.sum()) for r in removed] == [round(target * 32), round(target * 16)], step
        for name, mask in pruner.masks.items():  # what the forward pass sees, under the attached masks
            module, _, leaf = name.rpartition(".")
            assert torch.all(getattr(model.get_submodule(module), leaf)[~mask] == 0), (step, name)
        for layer, dead in zip((0, 2), removed):
            assert torch.all(model[layer].weight[dead] == 0) and torch.all(model[layer].bias[dead] == 0)
            assert torch.all(model[layer + 2].weight[:, dead] == 0)
    assert pruner.sparsity == 0.75 and pruner.masks.sparsity() > 0
    pruner.detach()
    with torch.no_grad():
        masked = model(digits.test_x)
        result = compact(model, pruner.masks)
        assert sum(after for _, after in result.sizes.values()) == 12
        assert torch.allclose(model(digits.test_x), masked, atol=1e-5)


def test_gradual_structured_pruner_resumes_bitwise():
    """Eight steps straight, or four, the pruner's, model's and optimizer's states saved and loaded into
    new objects, and four more: the same masks and weights bit for bit (each OBS step reads the whole
    data once, so a fresh pass over it gives the same gradients)."""
    import copy

    def build():
        model, data, _ = digits_mlp_and_batches()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        pruner = GradualPruner(model, 0.5, start_step=1, end_step=7, every=2, data=data,
                               loss_fn=nn.functional.cross_entropy, structure="neurons", num_grads=len(data),
                               block_size=16)
        return model, data, opt, pruner

    def train(model, data, opt, pruner, steps):
        for step in steps:
            x, y = data[step % len(data)]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            pruner.step()

    model_a, data, opt_a, straight = build()
    train(model_a, data, opt_a, straight, range(1, 9))
    model_b, _, opt_b, first = build()
    train(model_b, data, opt_b, first, range(1, 5))
    first.detach()
    saved = {"model": copy.deepcopy(model_b.state_dict()), "opt": copy.deepcopy(opt_b.state_dict()),
             "pruner": copy.deepcopy(first.state_dict())}
    assert saved["pruner"]["schedule"]["structures"] == [["neurons", "0", 32], ["neurons", "2", 16]]
    model_c, _, opt_c, resumed = build()
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    resumed.load_state_dict(saved["pruner"])
    assert resumed.current_step == 4 and resumed.sparsity == first.sparsity > 0
    train(model_c, data, opt_c, resumed, range(5, 9))
    assert resumed.sparsity == straight.sparsity == 24 / 48
    for name, mask in straight.masks.items():
        assert torch.equal(mask, resumed.masks[name]), name
    straight.detach()
    resumed.detach()
    for name, value in model_a.named_parameters():
        assert torch.equal(value, dict(model_c.named_parameters())[name]), name
    unstructured = GradualPruner(digits_mlp_and_batches()[0], 0.5, start_step=1, end_step=7, every=2,
                                 method="magnitude")
    with pytest.raises(ValueError, match="another schedule"):
        unstructured.load_state_dict(saved["pruner"])


def test_gradual_structured_pruner_checks_its_structures_when_built():
    from mfac.models import mlp
    from mfac.prune import ParamSlice, StructureGroup

    model, loss = mlp(8, (6,), 3), nn.functional.cross_entropy
    with pytest.raises(ValueError, match="structure must be one of"):
        GradualPruner(model, 0.5, 1, 3, 1, method="magnitude", structure="rows")
    with pytest.raises(ValueError, match="found no heads"):
        GradualPruner(model, 0.5, 1, 3, 1, method="magnitude", structure="heads")
    with pytest.raises(ValueError, match="params="):
        GradualPruner(model, 0.5, 1, 3, 1, method="magnitude", structure="neurons", params=["0.weight"])
    with pytest.raises(TypeError, match="pattern= .*structure="):
        GradualPruner(model, 0.5, 1, 3, 1, method="magnitude", structure="neurons", pattern="2:4")
    group = StructureGroup("0", "neurons", 6, (ParamSlice("0.weight", 0), ParamSlice("2.weight", 1)))
    with pytest.raises(ValueError, match="not both"):
        GradualPruner(model, 0.5, 1, 3, 1, method="magnitude", structure="neurons", groups=[group])
    with pytest.raises(ValueError, match="has shape"):
        GradualPruner(model, 0.5, 1, 3, 1, method="magnitude",
                      groups=[StructureGroup("0", "neurons", 5, (ParamSlice("0.weight", 0),))])
    with pytest.raises(ValueError, match="needs data"):
        GradualPruner(model, 0.5, 1, 3, 1, loss_fn=loss, structure="neurons")
    pruner = GradualPruner(model, 0.5, 1, 2, 1, method="magnitude", groups=[group])
    assert set(pruner.masks) == {"0.weight", "2.weight"}
    assert not pruner.step() and pruner.step()  # step 1: target 0, nothing to remove
    assert pruner.sparsity == 0.5 and int(pruner.removed_structures()[0].sum()) == 3
    with pytest.raises(RuntimeError, match="structured"):
        GradualPruner(mlp(8, (6,), 3), 0.5, 1, 3, 1, method="magnitude", params=["0.weight"]).removed_structures()


def test_gradual_pruner_progress_prints_lines_to_stderr_only_when_asked(capsys):
    rows = []
    runs = {}
    for progress in (False, True):
        model = small_net()
        pruner = GradualPruner(model, 0.5, start_step=1, end_step=5, every=2, data=image_batches(2),
                               loss_fn=nn.functional.cross_entropy, num_grads=8, recompute=2, block_size=16,
                               on_gradient_rows=rows.append, progress=progress)
        assert [pruner.step() for _ in range(5)] == [False, False, True, False, True]  # step 1: target 0
        runs[progress] = (pruner.sparsity, capsys.readouterr())
    quiet, shown = runs[False][1], runs[True][1]
    assert quiet.out == quiet.err == "" and shown.out == ""
    lines = shown.err.splitlines()
    assert any(line.startswith("GradualPruner step 3 -> 43.8%, gradients: ") for line in lines), lines
    assert any(line.startswith("GradualPruner step 5 -> 50.0%, gradients: 16/16") and "sparsity=" in line
               for line in lines), lines
    assert runs[True][0] == runs[False][0]  # the same pruning either way
    assert sum(rows) == 2 * 2 * 2 * 8  # the caller's hook still sees every row, with and without the bar
    with pytest.raises(TypeError, match="progress must be True or False"):
        GradualPruner(small_net(), 0.5, 1, 3, 1, method="magnitude", progress="yes")
