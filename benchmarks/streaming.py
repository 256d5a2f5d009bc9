"""Speed of the streamed block-diagonal Fisher (the route OBS takes when block_size <= num_grads),
against a plain float32 matrix product measured in the same run.

For d coordinates in blocks of B and m gradient rows arriving in chunks of c rows it times
  accumulate  the batched rank-c updates of every block's G_b^T G_b (2 d B m flops in all)
  factorise   Cholesky and triangular inverse of every B x B block, counted at the minimum
              B^3/3 + B^3/3 flops per block: float32 in the compiled kernel where a block's
              residual allows, float64 for the others (how many is reported)
  LAPACK      the same factorisation as before the kernel (batched float64 LAPACK), timed on the
              same statistics (skip with --no-lapack)
  matmul      one float32 (c, d) x (d, B) product, the same flops per row as the accumulation
  bmm         a float32 batched product of (B, B) matrices, the GEMM speed the factorisation is
              measured against
and reports GFLOP/s and peak resident memory (the process's high-water mark right after building the
inverse, and again after the reference matmul, whose (d, B) operand is as large as the statistics).
Synthetic Gaussian rows stand in for gradients.

    python benchmarks/streaming.py                 # MiniLM-L6's encoder: d = 10.6M, m = 1024, B = 128 and 50
    python benchmarks/streaming.py --dim 1000000   # a smaller check
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from mfac import kernels
from mfac.fisher import BlockFisherInverse
from mfac.fisher import blocks as block_module


def batched_matmul_gflops(size: int, dtype=torch.float32) -> float:
    """GFLOP/s of a batched product of 2048 (size, size) matrices, best of 3."""
    a = torch.randn(2048, size, size, dtype=dtype)
    torch.bmm(a, a)
    best = min(timed(lambda: torch.bmm(a, a)) for _ in range(3))
    return 2 * 2048 * size ** 3 / best / 1e9


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=10_616_832, help="d (default: MiniLM-L6's encoder Linear weights)")
    parser.add_argument("--grads", type=int, default=1024, help="m")
    parser.add_argument("--chunk", type=int, default=32, help="rows per streamed update")
    parser.add_argument("--blocks", type=int, nargs="+", default=[128, 50])
    parser.add_argument("--no-lapack", action="store_true", help="skip timing the float64 LAPACK factorisation")
    args = parser.parse_args()
    d, m, c = args.dim, args.grads, args.chunk
    print(f"# streamed block Fisher: torch {torch.__version__}, {torch.get_num_threads()} threads, d = {d:,}, "
          f"m = {m}, chunks of {c} rows, float32 statistics; kernels: {kernels.status()}\n")
    print("| B | accumulate s | accumulate GFLOP/s | matmul GFLOP/s (same shapes) | factorise s | factorise GFLOP/s "
          "| float64 blocks | bmm GFLOP/s (B x B, float32) | factorise / bmm | LAPACK float64 s | ihvp s "
          "| peak RSS GB, building | peak RSS GB, with the matmul's operand |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    chunk = torch.randn(c, d, generator=torch.Generator().manual_seed(0))
    for size in args.blocks:
        spent = {"factor": 0.0}
        original = block_module.inverse_cholesky_factors

        def timed_factor(*a, **k):
            start = time.perf_counter()
            result = original(*a, **k)
            spent["factor"] += time.perf_counter() - start
            return result

        block_module.inverse_cholesky_factors = timed_factor
        start = time.perf_counter()
        finv = BlockFisherInverse.from_chunks((chunk for _ in range(m // c)), d, size, relative_damp=0.3)
        total = time.perf_counter() - start
        block_module.inverse_cholesky_factors = original
        built_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # before the reference matmul
        accumulate = total - spent["factor"]
        right = torch.randn(d, size)
        chunk @ right  # warm-up
        start = time.perf_counter()
        for _ in range(2):
            chunk @ right
        matmul = (time.perf_counter() - start) / 2 * (m // c)  # the same flops as the accumulation
        del right
        start = time.perf_counter()
        finv.ihvp(chunk[0])
        ihvp = time.perf_counter() - start
        flops = 2 * d * size * m
        factor_flops = (d // size) * (2 / 3) * size ** 3  # Cholesky B^3/3 + triangular inverse B^3/3
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        float64_blocks = finv.float64_blocks
        del finv
        lapack = "-"
        if not args.no_lapack:  # the old route on the same statistics, rebuilt (accumulation not timed)
            saved = kernels.inverse_factors
            kernels.inverse_factors = lambda *args, **kwargs: None
            spent["factor"], factorise = 0.0, spent["factor"]
            block_module.inverse_cholesky_factors = timed_factor
            BlockFisherInverse.from_chunks((chunk for _ in range(m // c)), d, size, relative_damp=0.3)
            block_module.inverse_cholesky_factors, kernels.inverse_factors = original, saved
            lapack, spent["factor"] = f"{spent['factor']:.1f}", factorise
        bmm = batched_matmul_gflops(size)
        rate = factor_flops / spent["factor"] / 1e9
        print(f"| {size} | {accumulate:.1f} | {flops / accumulate / 1e9:.0f} | {flops / matmul / 1e9:.0f} | "
              f"{spent['factor']:.1f} | {rate:.1f} | {float64_blocks:,} of {d // size:,} | {bmm:.0f} "
              f"| {rate / bmm:.2f} "
              f"| {lapack} | {ihvp:.2f} | {built_peak:.1f} | {peak:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
