"""What the commands write: the run's environment, JSON that is always valid, Markdown tables and plots."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import torch

from .. import __version__

__all__ = ["environment", "json_safe", "write_json", "markdown_table", "run_header", "unused_settings",
           "write_markdown", "prune_figures", "pyplot"]

# Namespace entries that are not settings of the run.
_NOT_SETTINGS = ("quiet", "force", "option_defaults", "resume")
_TEXT_ONLY = ("max_length", "new_head")
_MFAC_ONLY = ("density", "window_dtype", "max_grad_norm")
_GRADUAL_ONLY = ("gradual", "steps", "optimizer", "lr", "prune_start", "prune_end", "prune_every", "checkpoint_every",
                 *_MFAC_ONLY)
_ONESHOT_ONLY = ("pattern", "structure", "compact", "latency_runs", "allow_untrained", "calibrate_bn")
_OBS_ONLY = ("num_grads", "per_sample", "damp", "relative_damp", "block_size", "recompute")


def environment(seed: int) -> dict:
    return {"mfac": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "threads": torch.get_num_threads(), "seed": seed}


def json_safe(value):
    """The same structure with NaN and infinities as None, so the JSON is valid for any reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def unused_settings(args) -> tuple[str, ...]:
    """The options of ``mfac train`` or ``mfac prune`` that this run does not use (text options for
    a built-in model, --gradual options for a one-shot prune, OBS options for magnitude pruning,
    MFAC options for another optimizer), left out of its report."""
    unused = ["allow_untrained"] if args.model.startswith("hf:") else [*_TEXT_ONLY]
    if args.command == "train":
        if args.optimizer != "mfac":
            unused += ["window", "damp", *_MFAC_ONLY] + (["momentum"] if args.optimizer == "adam" else [])
        return tuple(unused)
    if not args.gradual:
        unused += [*_GRADUAL_ONLY]
    else:
        unused += [*_ONESHOT_ONLY, *(_MFAC_ONLY if args.optimizer != "mfac" else ())]
    if args.method != "obs":
        unused += [*_OBS_ONLY]
    return tuple(unused)


def run_header(command: str, args, description: str, unused: tuple[str, ...] = ()) -> dict:
    """The opening entries of a command's report.json: the command, environment, data, model and the
    settings the run used (``unused``: options it does not use)."""
    return {"command": command, "environment": environment(args.seed), "data": description, "model": args.model,
            "settings": {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS and k not in unused}}


def write_markdown(path: Path, title: str, report: dict, figures: list[tuple[str, object]]) -> None:
    """``report.md``: the run's data and model, its figures, the per-layer sparsity when it pruned,
    its settings and files, from its report.json entries."""
    parts = [f"# {title}", "", f"Data: {report['data']}. Model: {report['model']}. Seed "
             f"{report['environment']['seed']}; mfac {report['environment']['mfac']}, torch "
             f"{report['environment']['torch']}, {report['environment']['threads']} threads.", "",
             "## Results", "", markdown_table(["figure", "value"], [[name, value] for name, value in figures]), ""]
    per_layer = report.get("per_tensor_sparsity")
    if per_layer:
        parts += ["## Per-layer sparsity", "",
                  markdown_table(["tensor", "sparsity"], [[f"`{name}`", f"{value:.4f}"] for name, value in
                                                          per_layer.items()]), ""]
    settings = {key: value for key, value in report["settings"].items() if key != "command"}
    parts += ["## Settings", "", markdown_table(["setting", "value"], [[f"--{key.replace('_', '-')}", value]
                                                                      for key, value in settings.items()]), ""]
    if report.get("files"):
        parts += [f"Files: {', '.join(report['files'])}."]
    path.write_text("\n".join(parts) + "\n")


_SIZE_FIGURES = (("parameters", "parameters"), ("nonzero_parameters", "non-zero parameters"),
                 ("flops_per_sample", "multiply-adds per sample"), ("file_bytes", "bytes on disk"),
                 ("latency_ms", "latency (ms per batch)"))


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def prune_figures(report: dict) -> list[tuple[str, str]]:
    """The figures of a ``mfac prune`` report, before -> after, for ``report.md``."""
    name = report.get("evaluated_on", "test")
    figures = [(f"{name} accuracy", f"{100 * report['test_accuracy_before']:.2f}% -> "
                                    f"{100 * report['test_accuracy_after']:.2f}%"),
               ("sparsity of the pruned tensors", f"{report['sparsity']:.4f}")]
    if "structures" in report:
        figures.append(("fraction of the structures removed", f"{report['structure_sparsity']:.4f}"))
        figures += [(kind, f"{n['before']:,} -> {n['after']:,}") for kind, n in report["structures"].items()]
    figures += [(label, f"{_number(report[f'{key}_before'])} -> {_number(report[f'{key}_after'])}")
                for key, label in _SIZE_FIGURES if f"{key}_before" in report]
    if "compacted" in report:
        figures.append((f"compacted model's {name} accuracy", f"{100 * report['compacted']['test_accuracy']:.2f}%"))
    if "gradual" in report:
        g = report["gradual"]
        figures.append(("pruning steps", f"{g['start_step']} to {g['end_step']}, every {g['every']}"))
    figures.append(("seconds", f"{report['seconds']:.1f}"))
    return figures


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
