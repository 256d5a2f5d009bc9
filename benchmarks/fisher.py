"""Speed and memory of the Fisher-inverse core, as ratios to the floor measured in the same run.

For each size it measures, on float32 gradients:
  floor       one G x plus one G^T a on the same (m, d) window: the two reads of the window that
              any exact F^-1 g needs
  push_ihvp   SlidingWindowFisherInverse.push_ihvp on a full window (steady state)
  m x m       the part of a push on a full window that is not a pass over the window: the O(m^2)
              update of the float64 Cholesky factor of the m x m matrix K and the probe checking it
  refactor    a fresh factorisation of K, O(m^3 / 3) (every push did this before the update; a push
              still does while the window fills, or when the probe finds the update drifted)
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
    python benchmarks/fisher.py --quick    # d up to 100k, m up to 256, with the spread of each time (seconds)
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
from mfac.fisher import woodbury

DAMP = 1e-4


def median_time(fn, reps: int) -> float:
    return median_times([fn], reps)[0]


def median_times(fns, reps: int, warmup: int = 1) -> list[float]:
    """Median seconds of each function, timed in alternation so that they share the machine's noise."""
    return [statistics.median(samples) for samples in timed_samples(fns, reps, warmup)]


def timed_samples(fns, reps: int, warmup: int = 1) -> list[list[float]]:
    """``reps`` seconds of each function, after ``warmup`` untimed rounds, timed in alternation (one
    call of each per round) so that they share the machine's noise."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return times


def spread(samples: list[float], scale: float = 1e3, digits: int = 2) -> str:
    """``median [min-max]`` of ``samples`` (seconds) in the unit of ``scale`` (1e3: ms)."""
    low, mid, high = min(samples) * scale, statistics.median(samples) * scale, max(samples) * scale
    return f"{mid:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"


def once(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def factor_small(gram: torch.Tensor):
    """A fresh m x m float64 Cholesky factor: what a push spent besides the window passes before
    the O(m^2) update (and still spends while the window fills, or when the update drifts)."""
    shifted = gram.clone()
    shifted.diagonal().add_(gram.shape[0] * DAMP)
    return torch.linalg.cholesky_ex(shifted)


def factor_update(gram: torch.Tensor):
    """A call doing what push_ihvp on a full window spends besides the window passes: the O(m^2)
    update of the Cholesky factor (oldest gradient out, newest in), the probe that checks it, and
    the triangular solve for the new gradient's coefficients."""
    m = gram.shape[0]
    base = woodbury.factor(gram, None, DAMP, False)
    column, diag = gram[0, 1:].contiguous(), float(gram[0, 0]) + m * DAMP  # the oldest comes back as the newest
    z = torch.ones(m, dtype=torch.float64)
    out = torch.zeros(m, m, dtype=torch.float64)  # a replaced factor's storage, reused as the window does

    def call():
        updated, product, k_times_z = woodbury.shifted(base, column, diag, 1, z, check=(gram, z), out=out)
        return woodbury.drift(product, k_times_z), updated.solve_newest()
    return call


def measure(d: int, m: int, reps: int, warmup: int = 1, setup_reps: int = 1) -> dict:
    """The figures of one (d, m) row: seconds (medians) and MB, and in ``samples`` every timed
    repeat of each seconds figure (setups: ``setup_reps`` of them, each a fresh object)."""
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(m, d, generator=gen)
    probes = torch.randn(reps + warmup + 2, d, generator=gen)
    x, a = probes[0], torch.randn(m, generator=gen)
    row = {"d": d, "m": m}
    win = SlidingWindowFisherInverse(d, m, DAMP)
    win.extend(grads)
    del grads
    gc.collect()
    window = win.storage.held(m)  # the floor reads the very storage push_ihvp reads
    counter = iter(range(10**9))
    gram = win.state_dict()["gram"]
    samples = dict(zip(("floor", "push_ihvp"), timed_samples([
        lambda: (torch.mv(window, x), torch.addmv(x, window.T, a, beta=2.0, alpha=-1.0)),
        lambda: win.push_ihvp(probes[next(counter) % len(probes)]),
    ], reps, warmup)))
    # Timed apart, each: the m x m update alone touches 24 MB of its own at m = 1024 (the old and new
    # factor, the Gram matrix), which pushed part of the window out of the cache: timed in
    # alternation with the pushes it added 0.2 ms to each push at d = 10k (2.92-3.00 against
    # 2.74 ms, same session; a push reads those 24 MB too, within its own time); a
    # LAPACK Cholesky leaves the machine slower for the next millisecond or so (its threads), +1 ms
    # on the next push. No Cholesky runs between the pushes of a full window, unless one refactorises.
    samples["factor"] = timed_samples([factor_update(gram)], reps, warmup)[0]
    samples["refactor"] = timed_samples([lambda: factor_small(gram)], reps, warmup)[0]
    row["window_MB"] = win.nbytes / 2**20
    grads = window.clone()
    del win, gram, window
    gc.collect()

    for name, build, arg in (("static", StaticFisherInverse, ()), ("block", BlockFisherInverse, (128,))):
        setups, inverse = [], None
        for _ in range(setup_reps):
            inverse = None  # the previous one is freed before the next is built
            seconds, inverse = once(lambda: build(grads, DAMP, *arg))
            setups.append(seconds)
        samples[f"{name}_setup"] = setups
        samples[f"{name}_ihvp"] = timed_samples([lambda: inverse.ihvp(x)], reps, warmup)[0]
        row[f"{name}_MB"] = inverse.nbytes / 2**20
        del inverse
        gc.collect()
    row["dense_MB"] = d * d * 4 / 2**20  # an explicit d x d inverse, for scale (never built here)
    del grads
    gc.collect()
    row.update({name: statistics.median(values) for name, values in samples.items()})
    row["samples"] = samples
    return row


def steady_push_ihvp(window, gen, reps: int) -> float:
    """Median seconds of push_ihvp on a full window, each push a different random gradient
    (generated before timing). A gradient pushed again while its first copy is still held makes
    the window exactly rank-deficient and the update fall back to a refactorisation, which is not
    the steady state of training: earlier versions of this script cycled 3 or 4 probes and timed
    some of those."""
    grads = iter(torch.randn(reps + 1, window.dim, generator=gen).unbind())
    return median_time(lambda: window.push_ihvp(next(grads)), reps)


def fill(window, d: int, m: int, gen) -> None:
    for start in range(0, m, 64):  # in slices, so a (m, d) float32 matrix never exists at once
        window.extend(torch.randn(min(64, m - start), d, generator=gen))


def measure_windows(d: int, m: int, reps: int, density: float) -> list[tuple[str, float, float]]:
    """(storage form, push_ihvp seconds, MB held) for each form; the first row is the floor."""
    gen = torch.Generator().manual_seed(0)
    x, a = torch.randn(d, generator=gen), torch.randn(m, generator=gen)
    rows = []
    win = SlidingWindowFisherInverse(d, m, DAMP)
    fill(win, d, m, gen)
    window = win.storage.held(m)
    rows.append(("float32 floor (G x + G^T a)", median_time(
        lambda: (torch.mv(window, x), torch.addmv(x, window.T, a, beta=2.0, alpha=-1.0)), reps), win.nbytes))
    rows.append(("float32 rows", steady_push_ihvp(win, gen, reps), win.nbytes))
    del win, window
    gc.collect()
    win = SlidingWindowFisherInverse(d, m, DAMP, dtype=torch.bfloat16)
    fill(win, d, m, gen)
    rows.append(("bfloat16 rows, compiled kernel" if kernels.available() else "bfloat16 rows, torch (no kernel)",
                 steady_push_ihvp(win, gen, reps), win.nbytes))
    setting = os.environ.get("MFAC_KERNELS")
    os.environ["MFAC_KERNELS"] = "0"  # the torch fallback, for reference
    kernels.reset()
    try:
        rows.append(("bfloat16 rows, torch upcast in chunks", steady_push_ihvp(win, gen, reps), win.nbytes))
    finally:
        if setting is None:
            os.environ.pop("MFAC_KERNELS")
        else:
            os.environ["MFAC_KERNELS"] = setting
        kernels.reset()
    del win
    gc.collect()
    for dtype in (torch.float32, torch.bfloat16):
        win = CompressedWindowFisherInverse(d, m, DAMP, density, dtype=dtype)
        fill(win, d, m, gen)
        name = "float32" if dtype == torch.float32 else "bfloat16"
        rows.append((f"compressed {density:g}, {name} values", steady_push_ihvp(win, gen, reps), win.nbytes))
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


def transformer_row(d: int, m: int, density: float, reps: int, dtypes=("bfloat16", "float32")) -> None:
    """The compressed window at transformer size: fill it, then time its parts and a whole push, with
    the compiled compression and with torch's top-k (the route before it), in the same run."""
    gen = torch.Generator().manual_seed(0)
    print(f"| {'values':<9} | {'d':>10} | {'m':>5} | {'density':>7} | {'fill s':>7} | {'push_ihvp s':>11} "
          f"| {'top-k s':>7} | {'G x s':>6} | {'G^T a s':>7} | {'GB held':>7} | {'GB/s (2 reads)':>14} "
          f"| push_ihvp s, torch top-k | top-k s, torch |")
    print(f"|{'-' * 11}|{'-' * 12}|{'-' * 7}|{'-' * 9}|{'-' * 9}|{'-' * 13}|{'-' * 9}|{'-' * 8}|{'-' * 9}"
          f"|{'-' * 9}|{'-' * 16}|---|---|")
    for dtype in [getattr(torch, name) for name in dtypes]:
        win = CompressedWindowFisherInverse(d, m, DAMP, density, dtype=dtype)
        start = time.perf_counter()
        fill(win, d, m, gen)
        filled = time.perf_counter() - start
        push = steady_push_ihvp(win, gen, reps)
        x, a = torch.randn(d, generator=gen), torch.randn(m, dtype=torch.float64, generator=gen)
        rows_held, storage = win.num_grads, win.storage
        topk = median_time(lambda: storage.encode(x), reps)  # error feedback and the top-k per block
        dots = median_time(lambda: storage.dots(x, rows_held), reps)
        combine = median_time(lambda: storage.combine(x, a, 1.0, -1.0, rows_held), reps)
        compiled, kernels.compress_blocks = kernels.compress_blocks, lambda *args: None
        try:
            push_torch = steady_push_ihvp(win, gen, reps)
            topk_torch = median_time(lambda: storage.encode(x), reps)
        finally:
            kernels.compress_blocks = compiled
        entries = win.window * storage.nnz * (storage.storage_dtype.itemsize + 2)
        name = "float32" if dtype == torch.float32 else "bfloat16"
        print(f"| {name:<9} | {d:>10,} | {m:>5} | {density:>7g} | {filled:>7.0f} | {push:>11.3f} | {topk:>7.3f} "
              f"| {dots:>6.3f} | {combine:>7.3f} | {win.nbytes / 1e9:>7.2f} | {2 * entries / 1e9 / (dots + combine):>14.1f} "
              f"| {push_torch:.3f} | {topk_torch:.3f} |", flush=True)
        del win
        gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes only (seconds)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement")
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="only these d (default: all)")
    parser.add_argument("--part", choices=["core", "windows", "transformer"], default="core")
    parser.add_argument("--density", type=float, default=0.01, help="compressed windows' density")
    parser.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float32"], default=["bfloat16", "float32"],
                        help="value dtypes of the transformer part")
    args = parser.parse_args()
    if args.part != "core":
        print(f"# mfac window storage forms: torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; kernels: {kernels.status()}")
        if args.part == "windows":
            sizes = [(100_000, 64)] if args.quick else [(1_000_000, 64), (1_000_000, 256), (4_000_000, 256),
                                                        (270_000, 1024)]
            windows_table(sizes, args.reps or 5, args.density)
        else:
            transformer_row(2_270_000 if args.quick else 22_700_000, 1024, args.density, args.reps or 3, args.dtypes)
        return
    dims = args.dims or ([10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000])
    windows = [64, 256] if args.quick else [64, 256, 1024]
    print(f"# mfac Fisher-inverse benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, float32 gradients, damp {DAMP}")
    if args.quick:
        quick_core(dims, windows, args.reps or QUICK_REPS)
        return
    header = (f"| {'d':>9} | {'m':>5} | {'floor ms':>9} | {'push_ihvp ms':>12} | {'/floor':>6} | {'m x m ms':>8} "
              f"| {'refactor ms':>11} | {'static setup s':>14} | {'static ihvp ms':>14} | {'block128 setup s':>16} "
              f"| {'block128 ihvp ms':>16} | {'window MB':>9} | {'static MB':>9} | {'block128 MB':>11} | {'dense MB':>10} |")
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for d in dims:
        for m in windows:
            reps = args.reps or (3 if d * m >= 10**8 else 10)
            r = measure(d, m, reps)
            print(f"| {d:>9,} | {m:>5} | {r['floor'] * 1e3:>9.2f} | {r['push_ihvp'] * 1e3:>12.2f} "
                  f"| {r['push_ihvp'] / r['floor']:>6.2f} | {r['factor'] * 1e3:>8.2f} "
                  f"| {r['refactor'] * 1e3:>11.2f} | {r['static_setup']:>14.2f} "
                  f"| {r['static_ihvp'] * 1e3:>14.2f} | {r['block_setup']:>16.2f} | {r['block_ihvp'] * 1e3:>16.2f} "
                  f"| {r['window_MB']:>9.0f} | {r['static_MB']:>9.0f} | {r['block_MB']:>11.0f} | {r['dense_MB']:>10.0f} |",
                  flush=True)


# Quick mode ------------------------------------------------------------------------------------

QUICK_REPS, QUICK_WARMUP, QUICK_SETUP_REPS = 15, 3, 3

QUICK_LEGEND = """\
Columns (each time: median [min-max] of its repeats; the repeats of floor, push_ihvp and m x m
alternate, so the three share the machine's noise; a busy machine widens the [min-max]):
  d, m              coordinates of a gradient, and gradients in the window
  reps              timed repeats of each ms figure, after {warmup} untimed warm-up rounds
                    (each setup s figure: {setup_reps} fresh builds)
  floor ms          one G x plus one G^T a on the (m, d) float32 window push_ihvp reads: the two
                    reads of the window that any exact F^-1 g needs
  push_ihvp ms      SlidingWindowFisherInverse.push_ihvp on a full window (steady state)
  /floor            push_ihvp / floor, of the medians (about 1-2 when a push is memory bound)
  min /floor        the same of the fastest repeats: steadier than /floor on a busy machine
  m x m ms          what a push on a full window does besides the window passes: the O(m^2)
                    update of the m x m Cholesky factor of K and the probe that checks it
  refactor ms       a fresh factorisation of K, O(m^3 / 3): what every push did before the update
  static, block128  StaticFisherInverse and BlockFisherInverse(block_size=128): setup s, ihvp ms
  MB columns        bytes each object holds; dense MB: an explicit d x d inverse (never built)
"""


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table with right-aligned columns as wide as their widest cell."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = ["| " + " | ".join(cell.rjust(w) for cell, w in zip(line, widths)) + " |" for line in [header, *rows]]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines


def quick_rows(results: list[dict], reps: int) -> list[str]:
    """The quick table of :func:`measure` rows: the full table's columns, each time as median
    [min-max] of its repeats, and a reps column."""
    header = ["d", "m", "reps", "floor ms", "push_ihvp ms", "/floor", "min /floor", "m x m ms", "refactor ms",
              "static setup s",
              "static ihvp ms", "block128 setup s", "block128 ihvp ms", "window MB", "static MB", "block128 MB",
              "dense MB"]
    rows = []
    for r in results:
        t = r["samples"]
        rows.append([f"{r['d']:,}", str(r["m"]), str(reps), spread(t["floor"]), spread(t["push_ihvp"]),
                     f"{r['push_ihvp'] / r['floor']:.2f}", f"{min(t['push_ihvp']) / min(t['floor']):.2f}",
                     spread(t["factor"]), spread(t["refactor"]), spread(t["static_setup"], 1, 3),
                     spread(t["static_ihvp"]), spread(t["block_setup"], 1, 3), spread(t["block_ihvp"]),
                     f"{r['window_MB']:.0f}", f"{r['static_MB']:.0f}", f"{r['block_MB']:.0f}", f"{r['dense_MB']:.0f}"])
    return table(header, rows)


def floor_notes(results: list[dict]) -> list[str]:
    """A note for every d whose floor does not grow with m (the bytes read grow with m): the
    timings of that run were disturbed (a busy machine), and should not be compared."""
    notes = []
    for a in results:
        for b in results:
            if a["d"] == b["d"] and a["m"] < b["m"] and a["floor"] > b["floor"]:
                notes.append(f"note: at d = {a['d']:,} the floor for m = {a['m']} ({a['floor'] * 1e3:.2f} ms) is above "
                             f"the floor for m = {b['m']} ({b['floor'] * 1e3:.2f} ms), which reads {b['m'] // a['m']}x "
                             f"the bytes: the machine was busy during this run (see the [min-max]); rerun it")
    return notes


def quick_core(dims: list[int], windows: list[int], reps: int) -> None:
    """The quick table: every row measured the same way (warm-up, repeats), printed at the end."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# quick mode: {reps} repeats per time after {QUICK_WARMUP} warm-up rounds; load average {load:.1f} "
          f"on {os.cpu_count()} CPUs at the start (above the CPU count, other processes share them)\n")
    print(QUICK_LEGEND.format(warmup=QUICK_WARMUP, setup_reps=QUICK_SETUP_REPS))
    measure(min(dims), min(windows), 2, QUICK_WARMUP)  # untimed: threads, allocator and kernels warm up first
    results = [measure(d, m, reps, QUICK_WARMUP, QUICK_SETUP_REPS) for d in dims for m in windows]
    print("\n".join(quick_rows(results, reps) + floor_notes(results)), flush=True)


if __name__ == "__main__":
    main()
