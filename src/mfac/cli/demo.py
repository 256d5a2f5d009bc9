"""``mfac demo``: the main job on scikit-learn's digits. Train an MLP with MFAC, Adam and SGD, prune
the MFAC-trained model one-shot with OBS and magnitude pruning (50-95% and 2:4), fine-tune the 90%
OBS model with its masks attached, and write report.json, report.md and plots."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

from ..defaults import PRUNE_BLOCK_SIZE, PRUNE_NUM_GRADS, PRUNE_RECOMPUTE, SMALL_MODEL_RECIPE
from ..models import mlp
from ..progress import Progress
from ..prune import prune_oneshot
from ..training import accuracy, mean_loss, train_classifier
from .optimizers import make_optimizer
from .output import check_out, staged_output
from .pruning_progress import pruning_progress
from .reports import environment, markdown_table, pyplot, write_json
from .tasks import load_task

DEMO = {
    "full": dict(steps=800, eval_every=40, sparsities=[0.5, 0.7, 0.8, 0.9, 0.95], recompute=PRUNE_RECOMPUTE,
                 num_grads=PRUNE_NUM_GRADS, finetune_steps=300),
    "quick": dict(steps=200, eval_every=20, sparsities=[0.5, 0.8, 0.9], recompute=8, num_grads=128,
                  finetune_steps=100),
}
_RECIPE = SMALL_MODEL_RECIPE
DEMO_OPTIMIZERS = {  # the README's recommended settings
    "MFAC": dict(name="mfac", lr=_RECIPE.lr, momentum=_RECIPE.momentum, window=_RECIPE.window, damp=_RECIPE.damp),
    "Adam": dict(name="adam", lr=3e-3),
    "SGD": dict(name="sgd", lr=3e-2, momentum=0.9),
}
FINETUNE_LR = 1e-3  # MFAC with the small-model recipe otherwise


def run(args) -> int:
    mode = "quick" if args.quick else "full"
    settings = DEMO[mode]
    out = check_out(args.out, "demo", args.force)
    started = time.perf_counter()
    task = load_task("digits", args.seed)
    split = task.split
    flat = split.flattened()
    report = {"command": "demo", "mode": mode, "environment": environment(args.seed),
              "data": {"name": "digits", "train": len(flat.train_x), "test": len(flat.test_x)},
              "model": "MLP 64-64-10", "settings": {**settings, "optimizers": DEMO_OPTIMIZERS},
              "training": {}, "pruning": {}, "finetune": {}, "timings_s": {}, "files": {}}
    trained = {}
    for name, opt_settings in DEMO_OPTIMIZERS.items():
        torch.manual_seed(args.seed)
        model = mlp(64, (64,))
        opt = make_optimizer(params=model.parameters(), **opt_settings)
        curve = [(0, mean_loss(model, flat.train_x, flat.train_y))]
        start = time.perf_counter()
        with Progress(settings["steps"], f"train {name}", args.quiet) as bar:
            def on_step(step, loss):
                bar.update(1, loss=loss)
                if (step + 1) % settings["eval_every"] == 0:
                    curve.append((step + 1, mean_loss(model, flat.train_x, flat.train_y)))
            train_classifier(model, flat.train_x, flat.train_y, opt, settings["steps"], seed=args.seed, on_step=on_step)
        report["training"][name] = {
            "final_train_loss": curve[-1][1], "initial_train_loss": curve[0][1],
            "test_accuracy": accuracy(model, flat.test_x, flat.test_y), "seconds": time.perf_counter() - start,
            "curve": [{"step": s, "train_loss": v} for s, v in curve]}
        trained[name] = model
    report["timings_s"]["training"] = sum(r["seconds"] for r in report["training"].values())

    base = trained["MFAC"]
    report["pruning"]["pruned_model"] = "the MLP trained with MFAC"
    report["pruning"]["dense_test_accuracy"] = accuracy(base, flat.test_x, flat.test_y)
    data = [(flat.train_x[i:i + 32], flat.train_y[i:i + 32]) for i in range(0, len(flat.train_x) - 31, 32)]
    targets = [*settings["sparsities"], "2:4"]
    start = time.perf_counter()
    curves, sparse_for_finetune = {"magnitude": [], "obs": []}, None
    for method in ("magnitude", "obs"):
        for target in targets:
            model = copy.deepcopy(base)
            pattern = target if isinstance(target, str) else None
            label = f"{method} {target if pattern else f'{target:.0%}'}"
            sub_steps = (min(settings["recompute"], 2) if pattern else settings["recompute"]) if method == "obs" else 1
            with pruning_progress(method, sub_steps, settings["num_grads"], f"prune {label}", args.quiet) as hooks:
                masks = prune_oneshot(model, None if pattern else target, data, nn.functional.cross_entropy,
                                      method=method, pattern=pattern, num_grads=settings["num_grads"],
                                      recompute=settings["recompute"], **hooks)
            curves[method].append({"target": str(target), "sparsity": masks.sparsity(),
                                   "test_accuracy": accuracy(model, flat.test_x, flat.test_y)})
            if method == "obs" and target == 0.9:
                sparse_for_finetune = (model, masks)
    report["pruning"]["curves"] = curves
    report["timings_s"]["pruning"] = time.perf_counter() - start

    if sparse_for_finetune is not None and settings["finetune_steps"]:
        model, masks = sparse_for_finetune
        before = accuracy(model, flat.test_x, flat.test_y)
        handle = masks.attach(model)
        opt = make_optimizer("mfac", model.parameters(), FINETUNE_LR)
        start = time.perf_counter()
        with Progress(settings["finetune_steps"], "fine-tune OBS 90%", args.quiet) as bar:
            train_classifier(model, flat.train_x, flat.train_y, opt, settings["finetune_steps"], seed=args.seed,
                             on_step=lambda step, loss: bar.update(1, loss=loss))
        handle.remove()
        zeros = sum(int((dict(model.named_parameters())[n][~m] == 0).sum()) for n, m in masks.items())
        report["finetune"] = {"model": "OBS 90%", "optimizer": f"MFAC lr {FINETUNE_LR:g}, window {_RECIPE.window}, "
                                                              f"damp {_RECIPE.damp:g}, momentum {_RECIPE.momentum:g}",
                              "steps": settings["finetune_steps"], "test_accuracy_before": before,
                              "test_accuracy_after": accuracy(model, flat.test_x, flat.test_y),
                              "pruned_weights_still_zero": zeros == sum(int((~m).sum()) for m in masks.values()),
                              "sparsity": masks.sparsity()}
        report["timings_s"]["finetune"] = time.perf_counter() - start

    with staged_output(out) as staging:
        report["files"] = _demo_files(staging, report)
        report["timings_s"]["total"] = time.perf_counter() - started
        (staging / "report.md").write_text(_demo_markdown(report))
        write_json(staging / "report.json", report)
    _print_demo_summary(report, out)
    return 0


def _demo_files(folder: Path, report: dict) -> dict:
    plt = pyplot()
    if plt is None:
        return {"report": "report.json", "summary": "report.md",
                "plots": "not written: matplotlib is not installed (pip install 'mfac-torch[cli]')"}
    def save(fig, ax, xlabel, ylabel, title, name):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in report["training"].items():
        ax.plot([p["step"] for p in result["curve"]], [p["train_loss"] for p in result["curve"]], label=name)
    ax.set_yscale("log")
    save(fig, ax, "step", "training loss (full training set)", "digits MLP: training loss", "loss_curves.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, points in report["pruning"]["curves"].items():
        unstructured = [p for p in points if p["target"] != "2:4"]
        line, = ax.plot([100 * p["sparsity"] for p in unstructured], [100 * p["test_accuracy"] for p in unstructured],
                        "o-", label="OBS (M-FAC)" if method == "obs" else "magnitude")
        nm = [p for p in points if p["target"] == "2:4"]
        ax.plot([100 * p["sparsity"] for p in nm], [100 * p["test_accuracy"] for p in nm], "s",
                color=line.get_color(), markerfacecolor="none", markersize=9)
    ax.axhline(100 * report["pruning"]["dense_test_accuracy"], color="gray", linestyle="--", label="dense")
    save(fig, ax, "sparsity % (open squares: 2:4)", "test accuracy %", "digits MLP: one-shot pruning", "pruning.png")
    return {"report": "report.json", "summary": "report.md", "plots": ["loss_curves.png", "pruning.png"]}


def _demo_markdown(report: dict) -> str:
    training = markdown_table(
        ["optimizer", "settings", "initial train loss", "final train loss", "test accuracy %", "seconds"],
        [[name, ", ".join(f"{k} {v}" for k, v in report["settings"]["optimizers"][name].items() if k != "name"),
          f"{r['initial_train_loss']:.3f}", f"{r['final_train_loss']:.4f}", f"{100 * r['test_accuracy']:.1f}",
          f"{r['seconds']:.1f}"] for name, r in report["training"].items()])
    curves = report["pruning"]["curves"]
    pruning = markdown_table(
        ["target", "sparsity", "magnitude accuracy %", "OBS accuracy %"],
        [[m["target"], f"{m['sparsity']:.3f}", f"{100 * m['test_accuracy']:.1f}", f"{100 * o['test_accuracy']:.1f}"]
         for m, o in zip(curves["magnitude"], curves["obs"])])
    parts = [f"# mfac demo ({report['mode']})", "",
             f"Data: scikit-learn digits, {report['data']['train']} training and {report['data']['test']} test images. "
             f"Model: {report['model']}. Seed {report['environment']['seed']}; mfac {report['environment']['mfac']}, "
             f"torch {report['environment']['torch']}.", "",
             f"## Training ({report['settings']['steps']} steps of 32 samples)", "", training, "",
             f"## One-shot pruning of {report['pruning']['pruned_model']} "
             f"(dense: {100 * report['pruning']['dense_test_accuracy']:.1f}%)", "",
             f"OBS: {report['settings']['num_grads']} mini-batch gradients, block {PRUNE_BLOCK_SIZE}, "
             f"{report['settings']['recompute']} recomputations.", "", pruning, ""]
    if report["finetune"]:
        f = report["finetune"]
        parts += ["## Fine-tuning the 90% OBS model with its masks attached", "",
                  f"{f['steps']} steps of {f['optimizer']}: test accuracy {100 * f['test_accuracy_before']:.1f}% -> "
                  f"{100 * f['test_accuracy_after']:.1f}%, sparsity {f['sparsity']:.3f}, pruned weights still zero: "
                  f"{f['pruned_weights_still_zero']}.", ""]
    parts += [f"Total time {report['timings_s']['total']:.1f} s."]
    return "\n".join(parts) + "\n"


def _print_demo_summary(report: dict, out: Path) -> None:
    print(f"mfac demo ({report['mode']}) on scikit-learn digits, seed {report['environment']['seed']}")
    print(f"{'optimizer':<8} {'final train loss':>17} {'test acc':>9}")
    for name, r in report["training"].items():
        print(f"{name:<8} {r['final_train_loss']:>17.4f} {100 * r['test_accuracy']:>8.1f}%")
    print(f"\n{'pruning':<8} {'sparsity':>9} {'magnitude':>10} {'OBS':>7}")
    curves = report["pruning"]["curves"]
    for m, o in zip(curves["magnitude"], curves["obs"]):
        print(f"{m['target']:<8} {m['sparsity']:>9.3f} {100 * m['test_accuracy']:>9.1f}% {100 * o['test_accuracy']:>6.1f}%")
    if report["finetune"]:
        f = report["finetune"]
        print(f"\nfine-tuned OBS 90%: {100 * f['test_accuracy_before']:.1f}% -> {100 * f['test_accuracy_after']:.1f}%")
    print(f"\nwritten to {out}/: report.json, report.md"
          + (", loss_curves.png, pruning.png" if isinstance(report["files"]["plots"], list) else
             f" ({report['files']['plots']})") + f"  [{report['timings_s']['total']:.1f} s]")
