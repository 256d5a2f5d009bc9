"""The compiled-kernel loader trusts nothing it did not build, and falls back to torch, saying why,
whenever a build or a load goes wrong (mfac.kernels and mfac.kernels.build)."""

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
import torch

from mfac import kernels
from mfac.kernels import build
from test_block_factorisation import check_gram_update, check_inverse_factors

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) on PATH")

# A library that would be loaded in place of the kernels: its constructor leaves a mark, and every
# "kernel" returns zeros, as the one found on a shared host did.
PLANTED = r"""
#include <stdio.h>
#include <stdint.h>
__attribute__((constructor)) static void mark(void) { FILE *f = fopen(MARKER, "w"); if (f) fclose(f); }
int dense_dots(const void *r, int64_t m, int64_t d, const float *x, double *out, int t)
{ for (int64_t i = 0; i < m; i++) out[i] = 0; return 0; }
int dense_combine() { return 0; }
int sparse_dots() { return 0; }
int sparse_combine() { return 0; }
"""


@pytest.fixture
def fresh(monkeypatch):
    """The loader with no outcome yet and a clean environment; forgotten again afterwards, so later
    tests load the kernels as configured for them."""
    for name in ("CC", "MFAC_KERNELS", "MFAC_KERNEL_CACHE", "MFAC_KERNEL_BUILD_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    kernels.reset()
    yield monkeypatch
    kernels.reset()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A cache this user built (once for the module): the names the loader looks for."""
    folder = tmp_path_factory.mktemp("reference") / "cache"
    saved = os.environ.get("MFAC_KERNEL_CACHE")
    os.environ["MFAC_KERNEL_CACHE"] = str(folder)
    kernels.reset()
    try:
        assert kernels.available(), kernels.status()
    finally:
        os.environ.pop("MFAC_KERNEL_CACHE") if saved is None else os.environ.update(MFAC_KERNEL_CACHE=saved)
        kernels.reset()
    (library,) = folder.glob("mfac_window_*.so")
    return library


def planted_library(folder: Path, marker: Path) -> Path:
    source = folder / "planted.c"
    source.write_text(PLANTED)
    out = folder / "planted.so"
    subprocess.run(["cc", "-shared", "-fPIC", f'-DMARKER="{marker}"', str(source), "-o", str(out)], check=True)
    return out


def plant(cache: Path, name: str, library: Path, with_sidecar: bool = True) -> None:
    """The planted library at the cache's name, with a sidecar whose hash matches it."""
    import hashlib

    shutil.copy(library, cache / name)
    if with_sidecar:
        digest = hashlib.sha256(library.read_bytes()).hexdigest()
        (cache / f"{name}.sha256").write_text(build.sidecar_text(name[len("mfac_window_"):-3], digest))


def products_are_right() -> bool:
    rows = torch.randn(5, 9000, generator=torch.Generator().manual_seed(0)).bfloat16()
    x = torch.randn(9000, generator=torch.Generator().manual_seed(1))
    expected = (rows.double() @ x.double())
    return bool(torch.allclose(kernels.dense_dots(rows, x), expected, rtol=1e-4, atol=1e-3))


def test_a_library_planted_in_a_world_writable_cache_is_not_loaded(fresh, reference, tmp_path):
    marker = tmp_path / "constructor-ran"
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # a shared host's folder: anyone may write here
    plant(shared, reference.name, planted_library(tmp_path, marker))
    before = sorted(p.name for p in shared.iterdir())
    fresh.setenv("MFAC_KERNEL_CACHE", str(shared))
    assert kernels.available(), kernels.status()  # built privately instead
    assert not marker.exists(), "the planted library's constructor ran"
    assert "writable by other users" in kernels.status() and "not cached" in kernels.status()
    assert products_are_right()
    assert sorted(p.name for p in shared.iterdir()) == before  # nothing read from or written to it


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="needs root to give a file away")
def test_a_library_owned_by_another_user_is_not_loaded(fresh, reference, tmp_path):
    marker = tmp_path / "constructor-ran"
    cache = tmp_path / "cache"
    shutil.copytree(reference.parent, cache)
    cache.chmod(0o700)
    plant(cache, reference.name, planted_library(tmp_path, marker))
    for path in cache.iterdir():
        os.chown(path, 65534, 65534)  # nobody's files, in a folder that is ours
    fresh.setenv("MFAC_KERNEL_CACHE", str(cache))
    assert kernels.available(), kernels.status()
    assert not marker.exists()
    assert "built into" in kernels.status()
    assert (cache / reference.name).stat().st_uid == os.getuid()  # replaced by our own build
    assert products_are_right()


@pytest.mark.parametrize("tamper", ["content", "mode", "no sidecar"])
def test_a_cached_library_that_fails_its_checks_is_rebuilt(fresh, reference, tmp_path, tamper):
    marker = tmp_path / "constructor-ran"
    cache = tmp_path / "cache"
    shutil.copytree(reference.parent, cache)
    cache.chmod(0o700)
    target = cache / reference.name
    if tamper == "content":  # our own file, but not the bytes recorded when it was built
        plant(cache, reference.name, planted_library(tmp_path, marker), with_sidecar=False)
    elif tamper == "mode":
        target.chmod(0o777)
    else:
        (cache / f"{reference.name}.sha256").unlink()
    fresh.setenv("MFAC_KERNEL_CACHE", str(cache))
    assert kernels.available(), kernels.status()
    assert "built into" in kernels.status()
    assert not marker.exists()
    assert target.read_bytes() == reference.read_bytes()
    assert not stat.S_IMODE(target.stat().st_mode) & 0o022
    assert products_are_right()
    kernels.reset()  # and the rebuilt one now loads as it is
    assert kernels.available() and "loaded from" in kernels.status()


def test_cc_with_arguments_is_split_as_a_shell_would(fresh, tmp_path):
    fresh.setenv("MFAC_KERNEL_CACHE", str(tmp_path / "cache"))
    fresh.setenv("CC", "cc -pipe")
    assert kernels.available(), kernels.status()
    assert products_are_right()
    fresh.setenv("CC", "cc 'unclosed")
    kernels.reset()
    assert not kernels.available() and "cannot be split" in kernels.status()


def test_a_compiler_that_hangs_times_out_and_falls_back(fresh, tmp_path):
    compiler = tmp_path / "hanging-cc"
    compiler.write_text("#!/bin/sh\nsleep 60\n")
    compiler.chmod(0o755)
    cache = tmp_path / "cache"
    fresh.setenv("MFAC_KERNEL_CACHE", str(cache))
    fresh.setenv("CC", str(compiler))
    fresh.setenv("MFAC_KERNEL_BUILD_TIMEOUT", "1")
    start = time.monotonic()
    assert not kernels.available()
    assert time.monotonic() - start < 15
    assert "did not finish within 1 s" in kernels.status() and kernels.status().startswith("torch fallback")
    assert products_are_right()  # the torch route
    assert list(cache.iterdir()) == []  # the build folder is gone
    sleepers = subprocess.run(["pgrep", "-f", str(compiler)], capture_output=True, text=True)
    assert sleepers.stdout.strip() == "" or shutil.which("pgrep") is None  # the whole process group was stopped


def test_a_library_without_the_kernels_falls_back(fresh, tmp_path):
    empty = tmp_path / "empty.c"
    empty.write_text("int unrelated(void) { return 0; }\n")
    compiler = tmp_path / "wrong-cc"  # compiles something else than it was asked to
    compiler.write_text('#!/bin/sh\nout=""\nwhile [ $# -gt 0 ]; do [ "$1" = "-o" ] && out="$2"; shift; done\n'
                        f'exec cc -shared -fPIC {empty} -o "$out"\n')
    compiler.chmod(0o755)
    fresh.setenv("MFAC_KERNEL_CACHE", str(tmp_path / "cache"))
    fresh.setenv("CC", str(compiler))
    assert not kernels.available()
    assert "has no 'dense_dots'" in kernels.status() and kernels.status().startswith("torch fallback")
    assert products_are_right()


def test_builds_leave_no_partial_files_and_old_ones_are_removed(fresh, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    stale, recent = cache / f"{build.BUILD_PREFIX}killed", cache / f"{build.BUILD_PREFIX}running"
    for folder in (stale, recent):
        folder.mkdir()
        (folder / "library.so").write_bytes(b"partial")
    old = time.time() - 2 * build.STALE_SECONDS
    os.utime(stale, (old, old))
    fresh.setenv("MFAC_KERNEL_CACHE", str(cache))
    assert kernels.available(), kernels.status()
    names = {p.name for p in cache.iterdir()}
    assert stale.name not in names and recent.name in names  # another process may still be building there
    assert {name for name in names if name.startswith(build.BUILD_PREFIX)} == {recent.name}


@pytest.mark.parametrize("isa_flags, width", [("", 16), ("-mno-avx512f", 8), ("-mno-avx512f -mno-avx", 0)])
def test_every_vector_width_computes_the_same_products(fresh, tmp_path, isa_flags, width):
    """The bfloat16 row kernels come in 16-float (AVX-512), 8-float (AVX with FMA) and portable
    forms, the widest the build's CPU flags allow (the compressed rows' dot products gather 16
    entries at a time with AVX-512; the block factorisation uses 64-byte vector types); each agrees
    with the float64 reference, for both products and the factorisation, and for lengths that leave
    a tail shorter than a vector. A width this CPU cannot build is skipped."""
    fresh.setenv("MFAC_KERNEL_CACHE", str(tmp_path / "cache"))
    fresh.setenv("CC", f"cc {isa_flags}".strip())
    if not kernels.available():
        pytest.skip(f"this compiler cannot build with {isa_flags}: {kernels.status()}")
    described = f"{width}-float vectors" if width else "portable loops"
    if described not in kernels.status():
        pytest.skip(f"{isa_flags} gave another width on this compiler: {kernels.status()}")
    gen = torch.Generator().manual_seed(3)
    for d in (9000, 8192 + 13, 7):
        rows = torch.randn(6, d, generator=gen).bfloat16()
        x, a = torch.randn(d, generator=gen), torch.randn(6, generator=gen)
        assert torch.allclose(kernels.dense_dots(rows, x), rows.double() @ x.double(), rtol=1e-4, atol=1e-3)
        expected = 0.5 * x.double() - 2.0 * (rows.double().T @ a.double())
        assert torch.allclose(kernels.dense_combine(rows, a, x, 0.5, -2.0).double(), expected, rtol=1e-4, atol=1e-3)
    check_sparse_products(gen)
    check_inverse_factors(gen)
    check_gram_update(gen)


def check_sparse_products(gen):
    """The compressed-row products (16-entry gathers with AVX-512) against the dense rows they hold."""
    d, rows, block = 3 * 8192 + 700, 5, 8192
    layout = kernels.BlockLayout.build(d, 0.01, block, rows)
    dense = torch.zeros(rows, d, dtype=torch.float64)
    offsets = torch.zeros(rows * layout.nnz, dtype=torch.int16)
    for b in range(layout.starts.numel() - 1):
        size, kept = min(block, d - b * block), int(layout.starts[b + 1] - layout.starts[b])
        for i in range(rows):
            chosen = torch.randperm(size, generator=gen)[:kept]  # distinct within the row's block
            position = layout.first[int(layout.starts[b])] + i * kept
            offsets[position: position + kept] = chosen.to(torch.int16)
    for value_dtype in (torch.float32, torch.bfloat16):
        values = torch.randn(rows * layout.nnz, generator=gen).to(value_dtype)
        dense.zero_()
        for i in range(rows):
            positions = layout.first + i * layout.kept
            dense[i, layout.bases + offsets[positions].long()] = values[positions].double()
        x, a = torch.randn(d, generator=gen), torch.randn(rows, generator=gen)
        dots = kernels.sparse_dots(layout, values, offsets, rows, x)
        assert torch.allclose(dots, dense @ x.double(), rtol=1e-4, atol=1e-4)
        combined = kernels.sparse_combine(layout, values, offsets, rows, a, x, 0.5, -2.0).double()
        assert torch.allclose(combined, 0.5 * x.double() - 2.0 * (dense.T @ a.double()), rtol=1e-4, atol=1e-4)
