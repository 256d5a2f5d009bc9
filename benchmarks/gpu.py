"""One GPU check, ready to run: the CUDA tests, then the hot paths against the same run's floors.

On a machine with one CUDA GPU, in under 8 minutes:

  tests     the CUDA cases of the test suite, with Triton's kernels compiled (TRITON_INTERPRET=0)
  floors    memory bandwidth (a large float32 copy, bytes read + written per second) and matmul
            speed (float32 GEMM, GFLOP/s), measured here, now
  windows   one MFAC window step (push_ihvp on a full window) at d = 25M, m = 1024 in float32,
            bfloat16 (Triton kernel) and compressed at 1% (Triton kernels), each with the bytes it
            must read and its time as a multiple of the bandwidth floor
  blocks    the streamed OBS block statistics (batched rank-n updates) and their factorisation at
            the size of MiniLM-L6's encoder (10.6M weights, blocks of 128), against the GEMM floor
  prune     one oBERT-protocol MiniLM prune end to end (70%, 1024 per-sample gradients, 8
            recomputations), when transformers, the MiniLM package and ../shared/data are present

    python benchmarks/gpu.py                 # everything (needs a GPU)
    python benchmarks/gpu.py --skip-tests    # the measurements only
    python benchmarks/gpu.py --device cpu --quick   # a smoke test of this script on any machine

Prints one table per part; record the figures in BENCHMARKS.md with the GPU's name.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mfac import MFAC
from mfac.fisher import BlockFisherInverse

ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, reps: int = 5) -> float:
    """Median seconds of ``fn`` after one warm-up, synchronising the device around each run."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def floors(device: torch.device, quick: bool) -> tuple[float, float]:
    """(bytes per second of a copy, counting read + write; float32 GEMM flop/s)."""
    n = (1 << 22) if quick else (1 << 28)
    source = torch.empty(n, dtype=torch.float32, device=device).normal_()
    target = torch.empty_like(source)
    bandwidth = 2 * source.numel() * 4 / timed(lambda: target.copy_(source), device)
    size = 512 if quick else 8192
    a = torch.randn(size, size, device=device)
    flops = 2 * size ** 3 / timed(lambda: a @ a, device)
    print(f"\n## Floors\n| copy GB/s | float32 GEMM GFLOP/s |\n|---|---|\n| {bandwidth / 1e9:.0f} | {flops / 1e9:.0f} |")
    return bandwidth, flops


def window_steps(device: torch.device, quick: bool, bandwidth: float) -> None:
    d, m = (200_000, 64) if quick else (25_000_000, 1024)
    forms = {"float32": dict(), "bfloat16": dict(window_dtype=torch.bfloat16),
             "compressed 1%": dict(density=0.01, window_dtype=torch.bfloat16)}
    print(f"\n## Window step, d = {d:,}, m = {m}\n| window | bytes read per step | step ms | x floor |\n|---|---|---|---|")
    for name, settings in forms.items():
        param = torch.nn.Parameter(torch.zeros(d, device=device))
        opt = MFAC([param], lr=1e-6, window=m, damp=1e-3, **settings)
        # Every row a different random gradient: a gradient pushed while an earlier copy (or a
        # multiple) of it is held makes the window rank-deficient, and each push would then pay a
        # refactorisation with an eigenvalue repair that training never pays.
        param.grad = torch.randn(d, device=device)
        opt.step()  # builds the window
        for _ in range(m - 1):  # fill the window one row at a time: a batch would need a second copy of it
            opt.fisher.push(torch.randn(d, device=device) * 1e-2)
        grads = iter([torch.randn(d, device=device) for _ in range(6)])  # the warm-up and 5 timed steps
        state = opt.fisher.storage.nbytes
        step = timed(lambda: (setattr(param, "grad", next(grads)), opt.step()), device)
        floor = 2 * state / bandwidth  # G g and G^T a: two reads of the stored rows
        print(f"| {name} | {2 * state / 1e9:.2f} GB | {step * 1e3:.1f} | {step / floor:.2f} |")
        del opt, param, grads
        if device.type == "cuda":
            torch.cuda.empty_cache()


def block_statistics(device: torch.device, quick: bool, flops: float) -> None:
    d, block, rows = (200_000, 128, 256) if quick else (10_616_832, 128, 1024)
    chunk = torch.randn(64, d, device=device)
    chunks = [chunk] * (rows // 64)
    accumulation = 2 * rows * d * block  # each row adds an outer product per block: 2 * B flops per weight
    factorisation = (d // block) * (block ** 3 / 3 + block ** 3)  # Cholesky, then the inverse of L
    start = time.perf_counter()
    finv = BlockFisherInverse.from_chunks(chunks, d, block, relative_damp=0.3, device=device, dtype=torch.float32)
    sync(device)
    total = time.perf_counter() - start
    print(f"\n## Streamed block statistics, d = {d:,}, B = {block}, {rows} rows\n"
          f"| total s | GFLOP/s (accumulation + factorisation) | x GEMM |\n|---|---|---|\n"
          f"| {total:.2f} | {(accumulation + factorisation) / total / 1e9:.0f} | "
          f"{(accumulation + factorisation) / total / flops:.2f} |")
    del finv


def cuda_tests() -> int:
    env = dict(os.environ, TRITON_INTERPRET="0")
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-k", "cuda", str(ROOT / "tests")]
    print("\n## CUDA tests\n" + " ".join(command), flush=True)
    return subprocess.call(command, env=env, cwd=ROOT, timeout=300)


def minilm_prune(quick: bool) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import pruning
    except ImportError as error:
        print(f"\n(MiniLM prune skipped: {error})")
        return
    if hasattr(pruning, "part_transformer"):
        pruning.part_transformer(quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke test")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the CUDA tests first")
    parser.add_argument("--skip-prune", action="store_true", help="do not run the MiniLM prune")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA device (or --device cpu --quick for a smoke test)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# GPU check on {name}, torch {torch.__version__}")
    if not args.skip_tests and device.type == "cuda" and cuda_tests() != 0:
        print("CUDA tests failed: fix them before recording figures")
    bandwidth, flops = floors(device, args.quick)
    window_steps(device, args.quick, bandwidth)
    block_statistics(device, args.quick, flops)
    if not args.skip_prune:
        minilm_prune(args.quick)


if __name__ == "__main__":
    main()
