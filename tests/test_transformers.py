"""OBS on transformers: dict batches with padding, per-sample gradients, streamed block statistics.

A tiny BERT is built from a config and a tokenizer whose vocabulary the test writes (no download).
"""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from conftest import BERT_WORDS as WORDS, rel_err
from conftest import tiny_bert as make_tiny_bert
from mfac.fisher import BlockFisherInverse
from mfac.grads import collect_gradients, cycle, gradient_chunks
from mfac.prune import GradualPruner, prune_oneshot

transformers = pytest.importorskip("transformers")

SENTENCES = ["the movie was good", "a very boring film", "great fun", "the plot is not good at all it was awful",
             "love it", "i hate the actors", "not bad", "a great great movie with very good actors"]


def tiny_bert(seed=0):
    return make_tiny_bert(seed).eval()


def dict_batches(tokenizer, size=4):
    batches = []
    for i in range(0, len(SENTENCES), size):
        batch = dict(tokenizer(SENTENCES[i:i + size], padding=True, return_tensors="pt"))
        batch["labels"] = torch.tensor([(i + j) % 2 for j in range(len(SENTENCES[i:i + size]))])
        batches.append(batch)
    return batches


def hf_loss(model, batch):
    return model(**batch).loss


def encoder_linears(model):
    return {n: p for n, p in model.named_parameters() if ".encoder." in n and n.endswith("weight") and p.dim() == 2}


def test_padding_is_real_in_the_batches(tokenizer):
    batch = dict_batches(tokenizer)[0]
    assert (batch["attention_mask"] == 0).any() and set(batch) >= {"input_ids", "attention_mask", "labels"}


def test_mini_batch_gradients_of_dict_batches_match_autograd(tokenizer):
    model = tiny_bert()
    params = encoder_linears(model)
    batches = dict_batches(tokenizer)
    rows = collect_gradients(model, params, cycle(batches), num_grads=len(batches), batch_loss=hf_loss)
    for row, batch in zip(rows, batches):
        grads = torch.autograd.grad(model(**batch).loss, list(params.values()))
        assert torch.allclose(row, torch.cat([g.reshape(-1) for g in grads]), atol=1e-6)


def single_sample_rows(model, params, batches):
    rows = []
    for batch in batches:
        for i in range(len(batch["labels"])):
            sample = {k: v[i:i + 1] for k, v in batch.items()}
            grads = torch.autograd.grad(model(**sample).loss, list(params.values()))
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def linears_with_biases(model):
    return {n: p for n, p in model.named_parameters() if ".encoder." in n and ("dense" in n or "query" in n
                                                                              or "key" in n or "value" in n)}


@pytest.mark.parametrize("choose", [encoder_linears, linears_with_biases])
def test_per_sample_gradients_of_a_padded_bert_match_single_sample_passes(tokenizer, recwarn, choose):
    """Every encoder Linear: the batched route through layer inputs and output gradients."""
    model = tiny_bert()
    params = choose(model)
    assert any(n.endswith("bias") for n in params) == (choose is linears_with_biases)
    batches = dict_batches(tokenizer)
    rows = collect_gradients(model, params, cycle(batches), num_grads=len(SENTENCES), per_sample=True,
                             batch_loss=hf_loss)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]  # no fallback was needed
    expected = single_sample_rows(model, params, batches)
    assert rows.shape == expected.shape and torch.allclose(rows, expected, atol=1e-6)


def test_per_sample_gradients_fall_back_to_a_loop_where_vmap_cannot_run_the_model(tokenizer):
    """A LayerNorm weight is not a Linear's: vmap is tried, Hugging Face's mask code defeats it."""
    model = tiny_bert()
    params = {n: p for n, p in model.named_parameters() if n.endswith("attention.output.LayerNorm.weight")}
    batches = dict_batches(tokenizer)
    with pytest.warns(RuntimeWarning, match="loop of single-sample backward passes"):
        rows = collect_gradients(model, params, cycle(batches), num_grads=len(SENTENCES), per_sample=True,
                                 batch_loss=hf_loss)
    assert torch.allclose(rows, single_sample_rows(model, params, batches), atol=1e-6)


def test_chunks_have_the_requested_rows_and_carry_the_masks(tokenizer):
    model = tiny_bert()
    params = encoder_linears(model)
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) > 0.5 for n, p in params.items()}
    chunks = list(gradient_chunks(model, params, cycle(dict_batches(tokenizer, size=3)), 7, batch_loss=hf_loss,
                                  per_sample=True, masks=masks, chunk_rows=2))
    assert [len(c) for c in chunks] == [2, 2, 2, 1]
    flat_mask = torch.cat([m.reshape(-1) for m in masks.values()]).to(torch.float32)
    expected = single_sample_rows(model, params, dict_batches(tokenizer, size=3))[:7] * flat_mask
    assert torch.allclose(torch.cat(chunks), expected, atol=1e-6)
    reused = [(c.data_ptr(), c.clone()) for c in gradient_chunks(model, params, cycle(dict_batches(tokenizer, size=3)),
                                                                   7, batch_loss=hf_loss, per_sample=True, masks=masks,
                                                                   chunk_rows=2, reuse_chunks=True)]
    assert len({ptr for ptr, _ in reused[:3]}) == 1  # one tensor refilled for the chunks of equal size
    assert torch.equal(torch.cat([c for _, c in reused]), torch.cat(chunks))
    with pytest.raises(ValueError, match="chunk_rows"):
        next(gradient_chunks(model, params, cycle(dict_batches(tokenizer)), 2, batch_loss=hf_loss, chunk_rows=0))


class MaskedMeanClassifier(nn.Module):
    """Embeds tokens, averages them over the attention mask, classifies: padding must not leak."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(len(WORDS) + 5, 8)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask, labels=None, token_type_ids=None):
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
        return nn.functional.cross_entropy(self.head(torch.tanh(self.hidden(pooled))), labels)


def masked_mean_rows(model, params, batches):
    expected = []
    for batch in batches:
        for i in range(len(batch["labels"])):
            loss = model(**{k: v[i:i + 1] for k, v in batch.items()})
            expected.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))]))
    return torch.stack(expected)


def test_per_sample_gradients_through_vmap_for_dict_batches(tokenizer, recwarn):
    model = MaskedMeanClassifier()
    params = {"hidden.weight": model.hidden.weight, "embed.weight": model.embed.weight}  # not all Linear: vmap
    batches = dict_batches(tokenizer)
    rows = collect_gradients(model, params, cycle(batches), num_grads=6, per_sample=True,
                             batch_loss=lambda net, batch: net(**batch))
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]  # vmap ran, no fallback
    assert torch.allclose(rows, masked_mean_rows(model, params, batches)[:6], atol=1e-6)


def test_a_loss_that_is_not_a_mean_over_samples_is_caught_and_still_exact(tokenizer):
    """The batched route assumes batch_loss is the mean of the samples' own losses; a summed loss
    breaks that, the first-batch check notices, and vmap gives the exact rows instead."""
    model = MaskedMeanClassifier()
    params = {"hidden.weight": model.hidden.weight, "head.weight": model.head.weight}
    batches = dict_batches(tokenizer)
    with pytest.warns(RuntimeWarning, match="mean over samples"):
        rows = collect_gradients(model, params, cycle(batches), num_grads=8, per_sample=True,
                                 batch_loss=lambda net, batch: net(**batch) * len(batch["labels"]))
    assert torch.allclose(rows, masked_mean_rows(model, params, batches), atol=1e-6)


class SharedLayerNet(nn.Module):
    """One Linear applied twice, sample-first 3-D activations, a bias: sums over calls and positions."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3, bias=False)

    def forward(self, x):  # x: (n, positions, 6)
        return self.head(torch.tanh(self.mix(torch.tanh(self.mix(x)))).mean(1))


def test_per_sample_gradients_of_a_layer_called_twice_with_loss_fn(recwarn):
    torch.manual_seed(0)
    model = SharedLayerNet()
    x, y = torch.randn(5, 4, 6), torch.randint(0, 3, (5,))
    params = dict(model.named_parameters())
    rows = collect_gradients(model, params, cycle([(x, y)]), nn.functional.cross_entropy, 5, per_sample=True)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    for i in range(5):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]),
                                    list(params.values()))
        assert torch.allclose(rows[i], torch.cat([g.reshape(-1) for g in grads]), atol=1e-6)


@pytest.mark.parametrize("block_size,dtype", [(5, torch.float32), (8, torch.float64), (50, torch.float32)])
@pytest.mark.parametrize("damping", [{"damp": 1e-3}, {"relative_damp": 1e-2}])
def test_streamed_blocks_equal_the_gradient_matrix_route(block_size, dtype, damping):
    gen = torch.Generator().manual_seed(0)
    grads = (torch.randn(60, 203, generator=gen, dtype=torch.float64) * torch.logspace(-2, 2, 203,
                                                                                       dtype=torch.float64)).to(dtype)
    held = BlockFisherInverse(grads, block_size=block_size, **damping)
    streamed = BlockFisherInverse.from_chunks(iter(grads.split(7)), 203, block_size, dtype=dtype, **damping)
    assert held.routes[0] == "primal" and streamed.num_grads == 60
    assert streamed.damp == pytest.approx(held.damp, rel=1e-6)
    x = torch.randn(3, 203, generator=gen, dtype=torch.float64).to(dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert rel_err(streamed.ihvp(x), held.ihvp(x)) <= tol
    assert rel_err(streamed.diag(), held.diag()) <= tol
    assert rel_err(streamed.column(101), held.column(101)) <= tol


@pytest.mark.parametrize("damping", [{"damp": 1e-3}, {"relative_damp": 0.3}])
def test_a_mask_on_streamed_blocks_equals_masking_every_row(damping):
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(40, 103, generator=gen, dtype=torch.float64)
    mask = torch.rand(103, generator=gen) > 0.4
    held = BlockFisherInverse(grads * mask, block_size=16, **damping)
    streamed = BlockFisherInverse.from_chunks(iter(grads.split(9)), 103, 16, dtype=torch.float64, mask=mask,
                                              **damping)
    x = torch.randn(2, 103, generator=gen, dtype=torch.float64)
    assert streamed.damp == pytest.approx(held.damp, rel=1e-12)
    assert rel_err(streamed.ihvp(x), held.ihvp(x)) <= 1e-10 and rel_err(streamed.diag(), held.diag()) <= 1e-10
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(103,\)"):
        BlockFisherInverse.from_chunks(iter(grads.split(9)), 103, 16, damp=1e-3, mask=mask.float())


def test_streamed_blocks_refuse_bad_chunks_and_impossible_sizes(monkeypatch):
    with pytest.raises(ValueError, match=r"shape \(n, 10\)"):
        BlockFisherInverse.from_chunks([torch.zeros(2, 9)], 10, 4, damp=1e-2)
    with pytest.raises(ValueError, match="NaN"):
        BlockFisherInverse.from_chunks([torch.full((2, 10), float("nan"))], 10, 4, damp=1e-2)
    from mfac import resources

    monkeypatch.setattr(resources, "available_bytes", lambda device: 10_000_000)
    with pytest.raises(MemoryError, match="lower block_size"):
        BlockFisherInverse.from_chunks([], 10**6, 128, relative_damp=1e-2)


@pytest.mark.parametrize("per_sample,block_size", [(False, 16), (True, 16), (True, 200)])
def test_obs_prunes_a_bert_through_batch_loss(tokenizer, per_sample, block_size):
    model = tiny_bert()
    params = list(encoder_linears(model))
    untouched = {n: p.detach().clone() for n, p in model.named_parameters() if n not in params}
    masks = prune_oneshot(model, 0.6, dict_batches(tokenizer), batch_loss=hf_loss, params=params,
                          num_grads=8, block_size=block_size, recompute=2, per_sample=per_sample)
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.6 * total)
    named = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.all(named[name][~mask] == 0)
    for name, value in untouched.items():
        assert torch.equal(named[name], value), name
    batch = dict_batches(tokenizer)[0]
    assert torch.isfinite(model(**batch).loss)


def test_gradual_pruner_takes_batch_loss(tokenizer):
    model = tiny_bert()
    pruner = GradualPruner(model, 0.5, start_step=1, end_step=3, every=1, data=dict_batches(tokenizer),
                           batch_loss=hf_loss, params=list(encoder_linears(model)), num_grads=4, block_size=8)
    for _ in range(3):
        pruner.step()
    assert abs(pruner.sparsity - 0.5) < 1e-3
    pruner.detach()


def test_streamed_route_holds_less_memory_than_the_gradient_matrix():
    """Peak resident memory of one OBS step on a 1M-weight MLP with 256 mini-batch gradients: the
    (256, d) matrix route holds 1 GB of gradients and 1 GB of factors; the streamed blocks hold
    d * 32 * 4 bytes = 128 MB, a 64 MB buffer of rows and float64 tiles."""
    code = textwrap.dedent("""
        import sys, torch
        from torch import nn
        from mfac.prune import prune_oneshot
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 10))
        data = [(torch.randn(4, 1000), torch.randint(0, 10, (4,))) for _ in range(8)]
        before = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])
        prune_oneshot(model, 0.5, data, nn.functional.cross_entropy, num_grads=256, recompute=1,
                      block_size=int(sys.argv[1]) or "exact")
        after = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])
        print(after - before)
    """)
    peaks = {}
    for block_size in (32, 0):  # 32 <= 256 gradients: streamed; 0: one block, through the gradient matrix
        result = subprocess.run([sys.executable, "-c", code, str(block_size)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        peaks[block_size] = int(result.stdout.split()[-1]) * 1024
    assert peaks[32] < 0.8e9 and peaks[0] > 2e9, peaks
