"""Shared references for the tests: dense float64 inverses, condition-scaled tolerances, awkward
gradient matrices, exact state comparison, and a tiny BERT."""

import copy
import math
import os

# Triton reads this when it is first imported: without a GPU its kernels run in its interpreter, on
# CPU tensors (tests/test_triton_kernels.py). mfac sends CPU tensors to Triton only when asked
# (MFAC_KERNELS=triton), so every other test keeps the CPU kernels. Set TRITON_INTERPRET=0 to test
# the compiled kernels on a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch
from hypothesis import strategies as st

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


def check_against(obj, fisher: torch.Tensor, tol: float, seed=1):
    """ihvp (single, batched, non-contiguous), diag, element and column all match F^-1 for the
    dense float64 ``fisher``, within relative error ``tol``."""
    d = fisher.shape[0]
    reference = solve(fisher, torch.eye(d, dtype=torch.float64))
    gen = torch.Generator().manual_seed(seed)
    dev = obj.device
    xs = torch.randn(4, d, generator=gen, dtype=torch.float64)
    expected = solve(fisher, xs.T).T
    assert rel_err(obj.ihvp(xs.to(dev, obj.dtype)), expected) <= tol
    assert rel_err(obj.ihvp(xs[0].to(dev, obj.dtype)), expected[0]) <= tol
    strided = torch.randn(d, 3, generator=gen, dtype=torch.float64)[:, 1]  # non-contiguous vector
    assert rel_err(obj.ihvp(strided.to(dev, obj.dtype)), solve(fisher, strided)) <= tol
    assert rel_err(obj.diag(), reference.diagonal()) <= tol
    i = torch.randint(0, d, (25,), generator=gen)
    j = torch.cat([i[:5], torch.randint(0, d, (20,), generator=gen)])  # some diagonal pairs
    got = obj.element(i.to(dev), j.to(dev))
    assert got.shape == (25,)
    assert float((got.double().cpu() - reference[i, j]).abs().max()) <= tol * float(reference.abs().max())
    scalar = obj.element(d - 1, 0)
    assert scalar.dim() == 0
    assert abs(float(scalar) - float(reference[d - 1, 0])) <= tol * float(reference.abs().max())
    for col in {0, d // 2, d - 1}:
        assert rel_err(obj.column(col), reference[:, col]) <= tol


# Gradient matrices: fixed awkward cases, and a hypothesis strategy ----------------------------------

def make_grads(case: str, dtype=torch.float64, seed=0) -> torch.Tensor:
    """A named (m, d) gradient matrix: shapes with m < d, m > d, m = 1, d = 1 and m = d; repeated,
    rank-deficient, collinear, all-zero, empty and non-contiguous rows; rows at scales over 6 orders."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"wide": (7, 23), "tall": (40, 9), "single": (1, 17), "d1": (5, 1), "square": (12, 12)}
    if case in shapes:
        m, d = shapes[case]
        return torch.randn(m, d, generator=gen, dtype=torch.float64).to(dtype)
    if case == "duplicate":
        g = torch.randn(3, 19, generator=gen, dtype=torch.float64)
        return torch.cat([g, g, g[:1]]).to(dtype)
    if case == "rank_deficient":
        return (torch.randn(20, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, 15, generator=gen,
                                                                                     dtype=torch.float64)).to(dtype)
    if case == "zeros":
        return torch.zeros(6, 10, dtype=dtype)
    if case == "empty":
        return torch.zeros(0, 8, dtype=dtype)
    if case == "noncontiguous":
        return torch.randn(21, 9, generator=gen, dtype=torch.float64).to(dtype).T  # (9, 21), strided
    if case == "collinear":  # one direction at scales 10^-2..10^2, and a zero row
        direction = torch.randn(13, generator=gen, dtype=torch.float64)
        scales = torch.tensor([1e-2, -1.0, 10.0, 0.0, 1e2, 2.0], dtype=torch.float64)
        return (scales[:, None] * direction).to(dtype)
    if case == "scales":  # independent rows at scales 10^-3..10^3 (F over 12 orders: what float64 resolves)
        scales = torch.logspace(-3, 3, 9, dtype=torch.float64)
        return (scales[:, None] * torch.randn(9, 16, generator=gen, dtype=torch.float64)).to(dtype)
    raise KeyError(case)


CASES = ["wide", "tall", "single", "d1", "square", "duplicate", "rank_deficient", "zeros", "empty", "noncontiguous"]
MORE_CASES = ["collinear", "scales"]

ROW_KINDS = ("random", "duplicate", "zero", "collinear", "combination")


@st.composite
def gradient_rows(draw, d: int, count: int, seed: int):
    """(count, d) float64 rows: random rows at scales 10^-6..10^6, and rows that repeat, scale or
    combine earlier ones, or are zero."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        kind = draw(st.sampled_from(ROW_KINDS)) if rows else "random"
        scale = 10.0 ** draw(st.floats(-6, 6))
        if kind == "random":
            row = torch.randn(d, generator=gen, dtype=torch.float64) * scale
        elif kind == "duplicate":
            row = rows[draw(st.integers(0, len(rows) - 1))].clone()
        elif kind == "zero":
            row = torch.zeros(d, dtype=torch.float64)
        elif kind == "collinear":
            row = rows[draw(st.integers(0, len(rows) - 1))] * (10.0 ** draw(st.floats(-3, 3)))
        else:
            weights = torch.randn(len(rows), generator=gen, dtype=torch.float64)
            row = weights @ torch.stack(rows)
        rows.append(row)
    return torch.stack(rows) if rows else torch.zeros(0, d, dtype=torch.float64)


# Backward stability against a reference refined in extended precision -------------------------------

def probes(grads: torch.Tensor, seed: int) -> torch.Tensor:
    """A random vector and (when there are gradients) the largest gradient: (n, d)."""
    x = torch.randn(1, grads.shape[1], generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    if len(grads) and float(grads.abs().max()) > 0:
        x = torch.cat([x, grads[grads.norm(dim=1).argmax()][None]])
    return x


def extended_fisher(grads: torch.Tensor, damp: float, block: int | None = None) -> np.ndarray:
    """F (block-diagonal with ``block``) formed in extended precision (x87 80-bit on x86)."""
    g = grads.double().cpu().numpy().astype(np.longdouble)
    m, d = g.shape
    fisher = g.T @ g / max(m, 1)
    if block is not None:
        blocks = np.arange(d) // block
        fisher = np.where(blocks[:, None] == blocks[None, :], fisher, 0)
    return fisher + np.longdouble(damp) * np.eye(d, dtype=np.longdouble)


def reference_solve(fisher: torch.Tensor, extended: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """F^-1 x refined to extended precision: a float64 Cholesky solve, then three rounds of
    iterative refinement with residuals computed in extended precision. Its own error is far below
    eps64 * cond(F), so the comparison measures only the method under test."""
    target = x.double().cpu().numpy().astype(np.longdouble)
    y = solve(fisher, x).numpy().astype(np.longdouble)
    for _ in range(3):
        residual = torch.from_numpy((target - extended @ y).astype(np.float64))
        y = y + solve(fisher, residual).numpy().astype(np.longdouble)
    return torch.from_numpy(y.astype(np.float64))


def assert_backward_stable(obj, fisher, grads, dtype, seed, extended=None):
    """F^-1 x from ``obj`` within ``tolerance(fisher, dtype)`` of the reference, for the ``probes``
    of ``grads`` (a random x, and the largest gradient: the nearly cancelling case of Woodbury);
    skipped (finiteness only) where cond(F) is beyond what the float64 reference resolves."""
    tol = tolerance(fisher, dtype)
    for x in probes(grads, seed):
        got = obj.ihvp(x.to(obj.device, obj.dtype))
        assert torch.isfinite(got).all()
        if tol >= 1:  # cond(F) beyond what float64 (the reference's precision) resolves
            continue
        expected = solve(fisher, x) if extended is None else reference_solve(fisher, extended, x)
        assert rel_err(got, expected) <= tol, (rel_err(got, expected), tol)


# States: deep snapshots, compared exactly --------------------------------------------------------------

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
