"""Shared references for the tests: dense float64 inverses and condition-scaled tolerances."""

import math

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Parametrising over this list keeps the CUDA cases visible (as skips) on machines without a GPU.
ALL_DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def dense_fisher(grads: torch.Tensor, damp: float) -> torch.Tensor:
    """F = damp*I + G^T G / m in float64 (m = rows of grads; F = damp*I when there are none)."""
    g = grads.double().cpu()
    m, d = g.shape
    return damp * torch.eye(d, dtype=torch.float64) + g.T @ g / max(m, 1)


def block_dense_fisher(grads: torch.Tensor, damp: float, block_size: int) -> torch.Tensor:
    """Block-diagonal reference: F restricted to blocks of consecutive coordinates, zero elsewhere."""
    d = grads.shape[1]
    out = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, d, block_size):
        stop = min(start + block_size, d)
        out[start:stop, start:stop] = dense_fisher(grads[:, start:stop], damp)
    return out


def solve(fisher: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """F^-1 rhs for rhs (d,) or (d, n) by a float64 Cholesky solve: backward stable, so accurate to
    eps * cond(F) even where rhs lies along F's large eigenvalues (a product with an explicit
    inverse is not)."""
    lower = torch.linalg.cholesky(fisher)
    return torch.cholesky_solve(rhs.double().cpu().reshape(fisher.shape[0], -1), lower).reshape(rhs.shape)


def tolerance(fisher: torch.Tensor, dtype: torch.dtype) -> float:
    """Relative error a backward-stable method may show: a floor of 1e-10 (float64) or 1e-4
    (float32 and lower), raised to 100 * eps * cond(F) when F is ill-conditioned."""
    eigs = torch.linalg.eigvalsh(fisher)
    # eigvalsh itself is only accurate to about d * eps * max eigenvalue: take the smallest value the
    # true minimum may have, so a condition number float64 cannot resolve gives an infinite tolerance.
    smallest = float(eigs[0]) - fisher.shape[0] * torch.finfo(torch.float64).eps * float(eigs[-1])
    cond = float(eigs[-1]) / smallest if smallest > 0 else math.inf
    floor = 1e-10 if dtype == torch.float64 else 1e-4
    return max(floor, 100 * torch.finfo(dtype).eps * cond)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


# Hypothesis: a profile sized for the 10-minute suite; HYPOTHESIS_PROFILE=thorough for long fuzzing.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("suite", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
import os  # noqa: E402

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))


# A tiny BERT and a tokenizer whose vocabulary the tests write (no download) ------------------------

BERT_WORDS = "the a movie film was is good bad great awful not very boring fun plot actors love hate it".split()


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tok")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS]) + "\n")
    tokenizer = transformers.BertTokenizer.from_pretrained(str(folder))
    assert len(tokenizer) == len(BERT_WORDS) + 5  # transformers 5 ignores vocab_file=; from_pretrained reads it
    return tokenizer


def tiny_bert(seed=0):
    """A 2-layer BERT classifier with hidden size 16, dropout off, in train mode."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(BERT_WORDS) + 5, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=24, max_position_embeddings=32,
                                     num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)
