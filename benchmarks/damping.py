"""Choosing OBS's default damping on held-out data: absolute damp against relative damp
(lambda = fraction x the mean Fisher diagonal), one-shot OBS with the library's other defaults.

  digits   MLP 64-64-10 trained with Adam on 75% of the digits minus 300 validation images, 3 seeds;
           pruned to 80% and 90% with 256 mini-batch gradients, block 128, 16 recomputations;
           accuracy on the 300 held-out validation images (never the test split).
  resnet   the published ResNet-20, BatchNorm re-estimated on images 0-1999 of the seeded CIFAR
           permutation (see pruning.py); pruned to 90% with 128 per-sample gradients and 4
           recomputations; accuracy on those same 2,000 selection images (the evaluation images
           2000-9999 are not looked at). Skipped without ../shared/data.
  minilm   MiniLM-L6 fine-tuned on SST-2 (pruning.py's protocol), its encoder Linear weights
           pruned to 70% with 256 per-sample gradients, 2 recomputations, blocks of 128; accuracy
           on the first 436 dev sentences (the selection half; pruning.py reports all 872).
           --quick: relative 0.1, 0.3 and 1.0 only, 128 gradients, one step.
           Skipped without transformers, the MiniLM package or ../shared/data.

    python benchmarks/damping.py [--part digits|resnet|minilm]
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from torch import nn

import mfac.fisher.blocks as blocks
from mfac.data import load_digits
from mfac.models import mlp
from mfac.prune import prune_oneshot, recalibrate_batchnorm
from mfac.training import accuracy, train_classifier

from pruning import SHARED, batches_accuracy, cifar_protocol, minilm_protocol  # same folder

SETTINGS = [{"damp": 1e-5}, {"damp": 1e-3}] + [{"relative_damp": r} for r in (1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0)]


def lambdas_used():
    """Record the lambda every inverse resolves to (relative damping depends on the gradients)."""
    seen = []
    original = blocks._resolve_damp

    def spy(*args):
        seen.append(original(*args))
        return seen[-1]

    blocks._resolve_damp = spy
    return seen


def label(kw):
    key, value = next(iter(kw.items()))
    return f"{'absolute' if key == 'damp' else 'relative'} {value:g}"


def part_digits(seen):
    print("\n| digits MLP | sparsity | damping | mean lambda | val accuracy % (3 seeds) |\n|---|---|---|---|---|")
    results = {}
    for seed in range(3):
        split = load_digits(seed=seed)
        tx, ty, vx, vy = split.train_x[300:], split.train_y[300:], split.train_x[:300], split.train_y[:300]
        torch.manual_seed(seed)
        model = mlp(64, (64,))
        train_classifier(model, tx, ty, torch.optim.Adam(model.parameters(), lr=3e-3), 800, seed=seed)
        data = [(tx[i:i + 32], ty[i:i + 32]) for i in range(0, len(tx) - 31, 32)]
        for sparsity in (0.8, 0.9):
            for kw in SETTINGS:
                pruned = copy.deepcopy(model)
                seen.clear()
                prune_oneshot(pruned, sparsity, data, nn.functional.cross_entropy, **kw)
                entry = results.setdefault((sparsity, label(kw)), ([], []))
                entry[0].append(100 * accuracy(pruned, vx, vy))
                entry[1].append(statistics.mean(seen))
    for (sparsity, name), (accs, lams) in results.items():
        print(f"| digits MLP | {sparsity:.0%} | {name} | {statistics.mean(lams):.2e} | "
              f"{statistics.mean(accs):.1f} +- {statistics.pstdev(accs):.1f} |", flush=True)


def part_resnet(seen):
    if not (SHARED / "cifar10_test_jpeg.npz").exists():
        print("\n(resnet part skipped: ../shared/data is not present)")
        return
    model, calib, grads, _ = cifar_protocol()
    recalibrate_batchnorm(model, calib, len(calib))
    x, y = torch.cat([b[0] for b in calib]), torch.cat([b[1] for b in calib])
    print(f"\n| ResNet-20 | sparsity | damping | mean lambda | selection accuracy % (dense "
          f"{100 * accuracy(model, x, y):.2f}) |\n|---|---|---|---|---|")
    for kw in SETTINGS:
        pruned = copy.deepcopy(model)
        seen.clear()
        prune_oneshot(pruned, 0.9, grads, nn.functional.cross_entropy, per_sample=True, num_grads=128, recompute=4,
                      **kw)
        recalibrate_batchnorm(pruned, calib, len(calib))
        print(f"| ResNet-20 | 90% | {label(kw)} | {statistics.mean(seen):.2e} | {100 * accuracy(pruned, x, y):.2f} |",
              flush=True)


def part_minilm(seen, quick: bool = False):
    protocol = minilm_protocol()
    if protocol is None:
        return
    model, obs_batches, dev_batches, _, _ = protocol
    half = sum(len(b["labels"]) for b in dev_batches) // 2
    selection, taken = [], 0  # the first half of the dev sentences, in order
    for batch in dev_batches:
        take = min(len(batch["labels"]), half - taken)
        if take <= 0:
            break
        selection.append({key: value[:take] for key, value in batch.items()})
        taken += take
    encoder = [n for n, p in model.named_parameters() if ".encoder." in n and n.endswith(".weight") and p.dim() == 2]
    print(f"\n| MiniLM-L6 | sparsity | damping | mean lambda | selection accuracy % ({taken} dev sentences, dense "
          f"{batches_accuracy(model, selection):.2f}) |\n|---|---|---|---|---|")
    settings = ([{"relative_damp": r} for r in (0.1, 0.3, 1.0)] if quick
                else [{"damp": 1e-5}] + [{"relative_damp": r} for r in (0.01, 0.1, 0.3, 1.0)])
    for kw in settings:
        pruned = copy.deepcopy(model)
        seen.clear()
        prune_oneshot(pruned, 0.7, obs_batches, batch_loss=lambda m, b: m(**b).loss, params=encoder, per_sample=True,
                      num_grads=128 if quick else 256, recompute=1 if quick else 2, block_size=128, **kw)
        print(f"| MiniLM-L6 | 70% | {label(kw)} | {statistics.mean(seen):.2e} | "
              f"{batches_accuracy(pruned, selection):.2f} |", flush=True)
        del pruned


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["digits", "resnet", "minilm"], default=None)
    parser.add_argument("--quick", action="store_true", help="minilm: three settings, 128 gradients, one step")
    args = parser.parse_args()
    seen = lambdas_used()
    print(f"# OBS damping on held-out data: torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.part in (None, "digits"):
        part_digits(seen)
    if args.part in (None, "resnet"):
        part_resnet(seen)
    if args.part in (None, "minilm"):
        part_minilm(seen, args.quick)


if __name__ == "__main__":
    main()
