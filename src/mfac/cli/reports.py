"""What the commands write: the run's environment, JSON that is always valid, Markdown tables and plots."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import torch

from .. import __version__

__all__ = ["environment", "json_safe", "write_json", "markdown_table", "run_header", "pyplot"]

# Namespace entries that are not settings of the run.
_NOT_SETTINGS = ("quiet", "force", "option_defaults")


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


def run_header(command: str, args, description: str) -> dict:
    """The opening entries of a command's report.json: the command, environment, data, model and settings."""
    return {"command": command, "environment": environment(args.seed), "data": description, "model": args.model,
            "settings": {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}}


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
