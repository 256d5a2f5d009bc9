"""Speed and memory of the Fisher-inverse core, as ratios to the floor measured in the same run.

For each size it measures, on float32 gradients:
  floor       one G x plus one G^T a on the same (m, d) window: the two reads of the window that
              any exact F^-1 g needs
  push_ihvp   SlidingWindowFisherInverse.push_ihvp on a full window (steady state)
  m x m       the part of a push that is not a pass over the window: the float64 Cholesky
              factorisation of the m x m matrix K that push_ihvp performs at every push
  static      StaticFisherInverse setup, and its ihvp
  block       BlockFisherInverse(block_size=128) setup, and its ihvp
and the bytes of state each object holds. Timings are medians of repeated runs.

    python benchmarks/fisher.py            # the full table (d up to 1M, m up to 1024; ~10 min, 14 GB)
    python benchmarks/fisher.py --quick    # d up to 100k, m up to 256 (seconds)
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time

import torch

from mfac.fisher import BlockFisherInverse, SlidingWindowFisherInverse, StaticFisherInverse

DAMP = 1e-4


def median_time(fn, reps: int) -> float:
    return median_times([fn], reps)[0]


def median_times(fns, reps: int) -> list[float]:
    """Median seconds of each function, timed in alternation so that they share the machine's noise."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def once(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def factor_small(gram: torch.Tensor):
    """What push_ihvp spends besides the window passes: a fresh m x m float64 Cholesky factor."""
    shifted = gram.clone()
    shifted.diagonal().add_(gram.shape[0] * DAMP)
    return torch.linalg.cholesky_ex(shifted)


def measure(d: int, m: int, reps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(m, d, generator=gen)
    probes = torch.randn(reps + 2, d, generator=gen)
    x, a = probes[0], torch.randn(m, generator=gen)
    row = {"d": d, "m": m}
    win = SlidingWindowFisherInverse(d, m, DAMP)
    win.extend(grads)
    del grads
    gc.collect()
    window = win._grads  # the floor reads the very storage push_ihvp reads
    counter = iter(range(10**9))
    gram = win._gram.clone()
    row["floor"], row["push_ihvp"], row["factor"] = median_times([
        lambda: (torch.mv(window, x), torch.addmv(x, window.T, a, beta=2.0, alpha=-1.0)),
        lambda: win.push_ihvp(probes[next(counter) % len(probes)]),
        lambda: factor_small(gram),
    ], reps)
    row["window_MB"] = win.nbytes / 2**20
    grads = window.clone()
    del win, gram, window
    gc.collect()

    row["static_setup"], static = once(lambda: StaticFisherInverse(grads, DAMP))
    row["static_ihvp"] = median_time(lambda: static.ihvp(x), reps)
    row["static_MB"] = static.nbytes / 2**20
    del static
    gc.collect()
    row["block_setup"], block = once(lambda: BlockFisherInverse(grads, DAMP, 128))
    row["block_ihvp"] = median_time(lambda: block.ihvp(x), reps)
    row["block_MB"] = block.nbytes / 2**20
    row["dense_MB"] = d * d * 4 / 2**20  # an explicit d x d inverse, for scale (never built here)
    del block, grads
    gc.collect()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes only (seconds)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement")
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="only these d (default: all)")
    args = parser.parse_args()
    dims = args.dims or ([10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000])
    windows = [64, 256] if args.quick else [64, 256, 1024]
    print(f"# mfac Fisher-inverse benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, float32 gradients, damp {DAMP}")
    header = (f"| {'d':>9} | {'m':>5} | {'floor ms':>9} | {'push_ihvp ms':>12} | {'/floor':>6} | {'m x m ms':>8} "
              f"| {'static setup s':>14} | {'static ihvp ms':>14} | {'block128 setup s':>16} "
              f"| {'block128 ihvp ms':>16} | {'window MB':>9} | {'static MB':>9} | {'block128 MB':>11} | {'dense MB':>10} |")
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for d in dims:
        for m in windows:
            reps = args.reps or (3 if d * m >= 10**8 else 10)
            r = measure(d, m, reps)
            print(f"| {d:>9,} | {m:>5} | {r['floor'] * 1e3:>9.2f} | {r['push_ihvp'] * 1e3:>12.2f} "
                  f"| {r['push_ihvp'] / r['floor']:>6.2f} | {r['factor'] * 1e3:>8.2f} "
                  f"| {r['static_setup']:>14.2f} "
                  f"| {r['static_ihvp'] * 1e3:>14.2f} | {r['block_setup']:>16.2f} | {r['block_ihvp'] * 1e3:>16.2f} "
                  f"| {r['window_MB']:>9.0f} | {r['static_MB']:>9.0f} | {r['block_MB']:>11.0f} | {r['dense_MB']:>10.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
