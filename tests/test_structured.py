"""Structured pruning: group OBS against a dense float64 reference, structure discovery, the
fraction removed, compaction (outputs, parameter counts, residual dimensions) and Hugging Face
folders of compacted encoders."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mfac.fisher import BlockFisherInverse, DenseFisherInverse, StaticFisherInverse
from mfac.models import mlp, resnet20, small_cnn
from mfac.prune import ParamSlice, StructureGroup, compact, find_structures, prune_oneshot
from mfac.prune.group_obs import Runs, saliencies, update


def dense_inverse(grads: torch.Tensor, damp: float, block: int) -> torch.Tensor:
    """The block-diagonal inverse of damp*I + G^T G / m, float64, from scratch."""
    grads = grads.double()
    m, d = grads.shape
    out = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, d, block):
        g = grads[:, start:start + block]
        fisher = damp * torch.eye(g.shape[1], dtype=torch.float64) + g.T @ g / m
        out[start:start + block, start:start + block] = torch.linalg.inv(fisher)
    return out


def random_structures(d: int, count: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Every coordinate owned by one structure, some by two (as a Linear between two hidden layers)."""
    owner = torch.randint(0, count, (d,), generator=generator)
    owner[:count] = torch.arange(count)
    extra = torch.randperm(d, generator=generator)[: d // 4]
    coords = torch.cat([torch.arange(d), extra])
    owners = torch.cat([owner, (owner[extra] + 1) % count])
    return coords, owners


@pytest.mark.parametrize("kind,block", [("static", None), ("block", 7), ("block", 16), ("dense", None)])
@pytest.mark.parametrize("m,d", [(30, 20), (5, 24), (1, 12), (40, 40)])
def test_group_obs_matches_dense_reference(kind, block, m, d):
    generator = torch.Generator().manual_seed(m * 100 + d)
    grads = torch.randn(m, d, generator=generator, dtype=torch.float64) * torch.logspace(-3, 2, d, dtype=torch.float64)
    grads[:, 3] = grads[:, 2] * 2.0  # collinear columns
    weights = torch.randn(d, generator=generator, dtype=torch.float64)
    damp = 1e-2
    if kind == "static":
        finv, block = StaticFisherInverse(grads, damp), d
    elif kind == "dense":
        finv, block = DenseFisherInverse(grads, damp), d
    else:
        finv = BlockFisherInverse(grads, damp, block)
    reference = dense_inverse(grads, damp, block)
    count = 5
    coords, owners = random_structures(d, count, generator)
    got = saliencies(finv, weights, Runs(coords, owners, finv.block_size), count)
    for j in range(count):
        q = coords[owners == j].unique()
        sub = reference[q][:, q]
        expected = 0.5 * weights[q] @ torch.linalg.solve(sub, weights[q])
        assert torch.allclose(got[j], expected, rtol=1e-8), (j, got[j], expected)
    removed = torch.zeros(d, dtype=torch.bool)
    removed[coords[owners == 1]] = True
    removed[coords[owners == 3]] = True
    q = removed.nonzero()[:, 0]
    expected = -reference[:, q] @ torch.linalg.solve(reference[q][:, q], weights[q])
    delta = update(finv, weights, removed)
    assert torch.allclose(delta, expected, rtol=1e-7, atol=1e-9 * float(weights.abs().max()))
    assert torch.allclose((weights + delta)[q], torch.zeros(len(q), dtype=torch.float64), atol=1e-8)


def test_discovery_on_bundled_models_leaves_residual_dimensions_alone():
    groups = find_structures(mlp(64, (32, 16), 10), "neurons")
    assert [(g.name, g.count) for g in groups] == [("0", 32), ("2", 16)]
    cnn = {g.name: (g.kind, g.count) for g in find_structures(small_cnn(), ("channels", "neurons"))}
    assert cnn == {"0": ("channels", 16), "2": ("channels", 32), "7": ("neurons", 64)}
    groups = find_structures(resnet20(), "channels")
    assert len(groups) == 9 and all(g.name.endswith(".conv1") for g in groups)
    touched = {part.name for g in groups for part in g.params}
    assert not any(".conv2.weight" in name and False for name in touched)
    assert all(not name.endswith(("bn2.weight", "bn2.bias")) and "downsample" not in name for name in touched)


def test_unrecognised_model_is_refused_with_what_was_found():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    with pytest.raises(ValueError, match="found no neurons.*groups="):
        prune_oneshot(Custom(), 0.5, method="magnitude", structure="neurons")
    with pytest.raises(ValueError, match="found no heads.*it has neurons"):
        find_structures(mlp(4, (8,), 2), "heads")
    group = StructureGroup("a", "neurons", 8, (ParamSlice("a.weight", 0), ParamSlice("a.bias", 0),
                                                ParamSlice("b.weight", 1)))
    model = Custom()
    x = torch.randn(5, 4)
    masks = prune_oneshot(model, 0.5, method="magnitude", groups=[group])
    assert int((~masks["a.bias"]).sum()) == 4
    masked = model(x)
    compact(model, masks, groups=[group])
    assert model.a.out_features == 4 and model.b.in_features == 4
    assert torch.allclose(model(x), masked, atol=1e-6)
    with pytest.raises(ValueError, match="has shape"):
        StructureGroup("a", "neurons", 5, (ParamSlice("a.weight", 0),)).check(Custom())


def _digits_batches(x_shape, classes=10, n=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *x_shape, generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    return x, [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


@pytest.mark.parametrize("method", ["obs", "magnitude"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_fraction_removed_compaction_and_outputs(method, scope):
    torch.manual_seed(0)
    model = mlp(64, (32, 16), 10).eval()
    x, data = _digits_batches((64,))
    masks = prune_oneshot(model, 0.5, data, nn.functional.cross_entropy, method=method, structure="neurons",
                          scope=scope, recompute=2, num_grads=16, block_size=16)
    removed = {name: int((~masks[name]).sum()) for name in ("0.bias", "2.bias")}
    if scope == "layer":
        assert removed == {"0.bias": 16, "2.bias": 8}
    else:
        assert sum(removed.values()) == 24
    masked = model(x)
    result = compact(model, masks)
    hidden = (32 - removed["0.bias"], 16 - removed["2.bias"])
    assert result.sizes == {"0": (32, hidden[0]), "2": (16, hidden[1])}
    expected = 64 * hidden[0] + hidden[0] + hidden[0] * hidden[1] + hidden[1] + hidden[1] * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == expected
    assert torch.allclose(model(x), masked, atol=1e-5)


def test_obs_moves_survivors_and_beats_norm_on_a_trained_mlp():
    from mfac.data import load_digits
    from mfac.training import accuracy, train_classifier

    digits = load_digits()
    torch.manual_seed(0)
    model = mlp(64, (64,), 10)
    train_classifier(model, digits.train_x, digits.train_y, torch.optim.Adam(model.parameters(), 3e-3), steps=300)
    data = [(digits.train_x[i:i + 32], digits.train_y[i:i + 32]) for i in range(0, 512, 32)]
    results = {}
    for method in ("obs", "magnitude"):
        pruned = copy.deepcopy(model).eval()
        prune_oneshot(pruned, 0.75, data, nn.functional.cross_entropy, method=method, structure="neurons",
                      recompute=4, num_grads=16, block_size=64)
        results[method] = accuracy(pruned, digits.test_x, digits.test_y)
    assert results["obs"] > results["magnitude"], results


def test_cnn_channels_with_batchnorm_and_residual_blocks():
    torch.manual_seed(0)
    model = resnet20().eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    x, data = _digits_batches((3, 16, 16), n=32)
    masks = prune_oneshot(model, 0.5, data, nn.functional.cross_entropy, structure="channels", recompute=2,
                          num_grads=8, block_size=64, scope="layer")
    masked = model(x)
    compact(model, masks)
    assert torch.allclose(model(x), masked, atol=1e-4)
    block = model.layer2[1]
    assert block.conv1.out_channels == 16 and block.bn1.num_features == 16 and block.conv2.in_channels == 16
    assert block.conv2.out_channels == 32 and block.bn2.num_features == 32  # the residual stream keeps its width
    assert block.bn1.running_mean.shape == (16,)


def test_compact_refuses_masks_the_weights_no_longer_follow():
    model = mlp(8, (6,), 3)
    masks = prune_oneshot(model, 0.5, method="magnitude", structure="neurons")
    name = next(n for n in ("0.weight",) if not masks[n].all())
    with torch.no_grad():
        model.get_parameter(name).add_(1.0)
    with pytest.raises(ValueError, match="changed since pruning"):
        compact(model, masks)


transformers = pytest.importorskip("transformers")


def tiny_bert(family: str = "bert"):
    torch.manual_seed(0)
    if family == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                                               num_labels=2, max_position_embeddings=32)
        return transformers.DistilBertForSequenceClassification(config).eval()
    config = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, num_labels=2, max_position_embeddings=32)
    return transformers.BertForSequenceClassification(config).eval()


def bert_batches(n=8):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (n, 10), generator=generator)
    labels = torch.randint(0, 2, (n,), generator=generator)
    return ids, [{"input_ids": ids[i:i + 4], "labels": labels[i:i + 4]} for i in range(0, n, 4)]


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_transformer_heads_and_neurons_compact_and_reload(family, tmp_path):
    from mfac.hf_compact import load_compacted, save_compacted

    model = tiny_bert(family)
    ids, data = bert_batches()
    masks = prune_oneshot(model, 0.5, data, batch_loss=lambda m, b: m(**b).loss, structure=("heads", "neurons"),
                          per_sample=True, num_grads=8, recompute=2, block_size=16)
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        result = compact(model, masks)
        compacted = model(input_ids=ids).logits
    assert torch.allclose(compacted, masked, atol=1e-5)
    kinds = {name: sizes for name, sizes in result.sizes.items()}
    assert sum(before - after for before, after in kinds.values()) > 0
    hidden = model.config.hidden_size if family == "bert" else model.config.dim
    assert all(p.shape[-1] in (hidden, 2) or "intermediate" in n or "lin2" in n or "output.dense" in n
               or "out_lin" in n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2
               and "embeddings" not in n)
    assert save_compacted(model, tmp_path) == "mfac"
    loaded = load_compacted(tmp_path)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, compacted, atol=1e-6)


def test_uniform_neuron_widths_reload_in_plain_transformers(tmp_path):
    from mfac.hf_compact import save_compacted

    model = tiny_bert()
    ids, data = bert_batches()
    masks = prune_oneshot(model, 0.25, data, batch_loss=lambda m, b: m(**b).loss, structure="neurons",
                          scope="layer", num_grads=4, recompute=1, block_size=16)
    with torch.no_grad():
        compact(model, masks)
        expected = model(input_ids=ids).logits
    assert save_compacted(model, tmp_path) == "transformers"
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    assert plain.config.intermediate_size == 36
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-6)


def test_loader_refuses_folders_that_ask_for_code(tmp_path):
    from mfac.hf_compact import load_compacted, save_compacted

    save_compacted(tiny_bert(), tmp_path)
    config = (tmp_path / "config.json")
    config.write_text(config.read_text().replace("{", '{"auto_map": {"AutoModel": "evil.Model"},', 1))
    with pytest.raises(ValueError, match="auto_map"):
        load_compacted(tmp_path)
