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

``--part windows`` compares storage forms of the sliding window, each as a ratio to the float32
floor of the same (d, m) in the same run: push_ihvp with float32 rows, bfloat16 rows (compiled
kernel, and torch's chunked upcast for reference), and compressed rows at density 1% (float32 and
bfloat16 values, error feedback, compiled kernels), with the bytes each holds. ``--part
transformer`` times the compressed window at the size of MiniLM-L6 (d = 22.7M, m = 1024, 1%),
where a float32 window (93 GB) cannot be built to compare with.

    python benchmarks/fisher.py            # the full table (d up to 1M, m up to 1024; ~10 min, 14 GB)
    python benchmarks/fisher.py --quick    # d up to 100k, m up to 256 (seconds)
    python benchmarks/fisher.py --part windows        # storage forms at d = 1M and 4M (~5 min, 7 GB)
    python benchmarks/fisher.py --part transformer    # compressed m = 1024 at d = 22.7M (~6 min, 3 GB)
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time

import torch

from mfac import kernels
from mfac.fisher import BlockFisherInverse, CompressedWindowFisherInverse, SlidingWindowFisherInverse, StaticFisherInverse

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


def steady_push_ihvp(window, probes, reps: int) -> float:
    """Median seconds of push_ihvp on a full window (probes generated before timing)."""
    counter = iter(range(10**9))
    return median_time(lambda: window.push_ihvp(probes[next(counter) % len(probes)]), reps)


def fill(window, d: int, m: int, gen) -> None:
    for start in range(0, m, 64):  # in slices, so a (m, d) float32 matrix never exists at once
        window.extend(torch.randn(min(64, m - start), d, generator=gen))


def measure_windows(d: int, m: int, reps: int, density: float) -> list[tuple[str, float, float]]:
    """(storage form, push_ihvp seconds, MB held) for each form; the first row is the floor."""
    gen = torch.Generator().manual_seed(0)
    probes = torch.randn(4, d, generator=gen)
    x, a = probes[0], torch.randn(m, generator=gen)
    rows = []
    win = SlidingWindowFisherInverse(d, m, DAMP)
    fill(win, d, m, gen)
    window = win._grads
    rows.append(("float32 floor (G x + G^T a)", median_time(
        lambda: (torch.mv(window, x), torch.addmv(x, window.T, a, beta=2.0, alpha=-1.0)), reps), win.nbytes))
    rows.append(("float32 rows", steady_push_ihvp(win, probes, reps), win.nbytes))
    del win, window
    gc.collect()
    win = SlidingWindowFisherInverse(d, m, DAMP, dtype=torch.bfloat16)
    fill(win, d, m, gen)
    rows.append(("bfloat16 rows, compiled kernel" if kernels.available() else "bfloat16 rows, torch (no kernel)",
                 steady_push_ihvp(win, probes, reps), win.nbytes))
    usable = kernels._usable
    kernels._usable = lambda *tensors: None
    try:
        rows.append(("bfloat16 rows, torch upcast in chunks", steady_push_ihvp(win, probes, reps), win.nbytes))
    finally:
        kernels._usable = usable
    del win
    gc.collect()
    for dtype in (torch.float32, torch.bfloat16):
        win = CompressedWindowFisherInverse(d, m, DAMP, density, dtype=dtype)
        fill(win, d, m, gen)
        name = "float32" if dtype == torch.float32 else "bfloat16"
        rows.append((f"compressed {density:g}, {name} values", steady_push_ihvp(win, probes, reps), win.nbytes))
        del win
        gc.collect()
    return rows


def windows_table(sizes, reps: int, density: float) -> None:
    print(f"| {'d':>10} | {'m':>5} | {'window':<38} | {'push_ihvp ms':>12} | {'/ float32 floor':>15} "
          f"| {'MB held':>9} |")
    print(f"|{'-' * 12}|{'-' * 7}|{'-' * 40}|{'-' * 14}|{'-' * 17}|{'-' * 11}|")
    for d, m in sizes:
        rows = measure_windows(d, m, reps, density)
        floor = rows[0][1]
        for name, seconds, nbytes in rows:
            print(f"| {d:>10,} | {m:>5} | {name:<38} | {seconds * 1e3:>12.1f} | {seconds / floor:>15.2f} "
                  f"| {nbytes / 2**20:>9.0f} |", flush=True)


def transformer_row(d: int, m: int, density: float, reps: int) -> None:
    """The compressed window at transformer size: fill it, then time its parts and a whole push."""
    gen = torch.Generator().manual_seed(0)
    print(f"| {'values':<9} | {'d':>10} | {'m':>5} | {'density':>7} | {'fill s':>7} | {'push_ihvp s':>11} "
          f"| {'top-k s':>7} | {'G x s':>6} | {'G^T a s':>7} | {'GB held':>7} | {'GB/s (2 reads)':>14} |")
    print(f"|{'-' * 11}|{'-' * 12}|{'-' * 7}|{'-' * 9}|{'-' * 9}|{'-' * 13}|{'-' * 9}|{'-' * 8}|{'-' * 9}"
          f"|{'-' * 9}|{'-' * 16}|")
    for dtype in (torch.bfloat16, torch.float32):
        win = CompressedWindowFisherInverse(d, m, DAMP, density, dtype=dtype)
        start = time.perf_counter()
        fill(win, d, m, gen)
        filled = time.perf_counter() - start
        probes = torch.randn(3, d, generator=gen)
        push = steady_push_ihvp(win, probes, reps)
        x, a = probes[0], torch.randn(m, dtype=torch.float64, generator=gen)
        topk = median_time(lambda: win._compress(x), reps)
        dots = median_time(lambda: win._window_dots(x), reps)
        combine = median_time(lambda: win._window_combine(x, a, 1.0, -1.0), reps)
        entries = win._values.numel() * (win._values.element_size() + 2)
        name = "float32" if dtype == torch.float32 else "bfloat16"
        print(f"| {name:<9} | {d:>10,} | {m:>5} | {density:>7g} | {filled:>7.0f} | {push:>11.3f} | {topk:>7.3f} "
              f"| {dots:>6.3f} | {combine:>7.3f} | {win.nbytes / 1e9:>7.2f} | {2 * entries / 1e9 / (dots + combine):>14.1f} |",
              flush=True)
        del win
        gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes only (seconds)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement")
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="only these d (default: all)")
    parser.add_argument("--part", choices=["core", "windows", "transformer"], default="core")
    parser.add_argument("--density", type=float, default=0.01, help="compressed windows' density")
    args = parser.parse_args()
    if args.part != "core":
        print(f"# mfac window storage forms: torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; kernels: {kernels.status()}")
        if args.part == "windows":
            sizes = [(100_000, 64)] if args.quick else [(1_000_000, 64), (1_000_000, 256), (4_000_000, 256),
                                                        (270_000, 1024)]
            windows_table(sizes, args.reps or 5, args.density)
        else:
            transformer_row(2_270_000 if args.quick else 22_700_000, 1024, args.density, args.reps or 3)
        return
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
