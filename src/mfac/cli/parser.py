"""The command line's grammar. Every number is checked as it is parsed, so bad values end with one
line and exit status 2 before any work starts.

The grammar names each subcommand (``args.command``); :func:`mfac.cli.main` runs the module of that
name. This module imports none of the command modules, and they do not import it."""

from __future__ import annotations

import argparse
import math

from .. import __version__
from ..defaults import (CHECKPOINT_EVERY, GRADUAL_LR, GRADUAL_NUM_GRADS, GRADUAL_RECOMPUTE, PRUNE_BLOCK_SIZE,
                        PRUNE_NUM_GRADS, PRUNE_RECOMPUTE, PRUNE_RELATIVE_DAMP, SMALL_MODEL_RECIPE, TRANSFORMER_RECIPE)
from .optimizers import OPTIMIZERS

__all__ = ["build_parser", "MODELS", "WINDOW_DTYPES"]

MODELS = ("mlp", "cnn", "resnet20")
WINDOW_DTYPES = ("float32", "bfloat16")  # mfac.cli.optimizers maps them to torch dtypes
STRUCTURES = ("neurons", "channels", "heads")  # mfac.prune.structures.KINDS, without importing torch here
LATENCY_RUNS = 20
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32: 1/damp must stay finite


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the uninformative None and False ones."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """One line instead of usage + message, pointing to the (sub)command's own --help; arguments that
    no option takes are reported by the subcommand they were given to."""

    commands = None  # the subcommands' parsers by name, set on the top-level parser

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # `--window` is not `--window-dtype`
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            owner = (self.commands or {}).get(getattr(parsed, "command", None), self)
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def integer(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high if high is not None else 'inf'}], got {value}")
        return value
    return parse


def number(low: float, high: float, low_open: bool = False, high_open: bool = False, why: str = ""):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low) \
                or (high_open and value == high):
            bound = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number in {bound}{why}, got {text}")
        return value
    return parse


def model_spec(text: str) -> str:
    if text in MODELS or (text.startswith("hf:") and len(text) > 3):
        return text
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(MODELS)} or hf:PATH (a local Hugging Face model "
                                     f"folder), got {text!r}")


def nm_pattern(text: str) -> str:
    """``--pattern N:M`` with 0 < N < M, kept as written (the library parses it again)."""
    parts = text.split(":")
    if len(parts) == 2 and all(part.strip().isdigit() for part in parts) and 0 < int(parts[0]) < int(parts[1]):
        return text
    raise argparse.ArgumentTypeError(f"expected N:M with 0 < N < M (remove N of every M weights), such as 2:4, got "
                                     f"{text!r}")


def structure_list(text: str) -> tuple[str, ...]:
    """``neurons``, ``channels``, ``heads`` or a comma list of them (``heads,neurons``)."""
    kinds = tuple(dict.fromkeys(part.strip() for part in text.split(",")))
    if not kinds or any(kind not in STRUCTURES for kind in kinds):
        raise argparse.ArgumentTypeError(f"expected {', '.join(STRUCTURES[:-1])} or {STRUCTURES[-1]}, or a comma list "
                                         f"of them (e.g. heads,neurons), got {text!r}")
    return kinds


LEARNING_RATE = number(0, FLOAT32_MAX, low_open=True)
DAMP = number(FLOAT32_TINY, FLOAT32_MAX, why=" (1/damp must be a float32 number)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mfac", description="M-FAC second-order optimization and pruning for PyTorch: train and "
                                              "prune built-in models (mlp, cnn, resnet20) or local Hugging Face "
                                              "models (hf:PATH) on text.",
                     formatter_class=_Formatter,
                     epilog="Exit status: 0 success, 2 bad usage, 1 failure while running, 130 Ctrl-C. "
                            "`mfac COMMAND --help` describes each command.")
    parser.add_argument("--version", action="version", version=f"mfac {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    _add_demo(commands)
    _add_train(commands)
    _add_prune(commands)
    _add_bench(commands)
    parser.commands = dict(commands.choices)
    return parser


def _output_options(sub) -> None:
    sub.add_argument("--out", default=None, help="output folder, created at the end (a symbolic link to a folder "
                                                 "elsewhere is followed) (default: a new folder under ./mfac-runs/)")
    sub.add_argument("--force", action="store_true", help="write into --out even if it is not empty")
    sub.add_argument("--seed", type=integer(0, 2**63 - 1), default=0,
                     help="random seed (runs are deterministic per machine)")
    sub.add_argument("--quiet", action="store_true", help="no progress output")


def _model_data_options(sub) -> None:
    sub.add_argument("--model", default="mlp", type=model_spec, metavar="MODEL",
                     help=f"a built-in model ({', '.join(MODELS)}) or hf:PATH, a local Hugging Face model folder "
                          f"with its tokenizer (its sequence-classification head is kept, or one is added to a base "
                          f"model)")
    sub.add_argument("--data", default="digits",
                     help="digits, mnist-idx:PATH or cifar-npz:PATH for built-in models; tsv:PATH (a folder "
                          "with *train*.tsv and *dev*.tsv, or one file) with label and text columns for hf: models")
    sub.add_argument("--max-length", type=integer(1), default=64, help="hf: models: tokens kept per text")
    sub.add_argument("--new-head", action="store_true",
                     help="hf: models: replace the model's fine-tuned classification head with a fresh one sized to "
                          "the data's labels (without it, the labels must be the head's own)")
    sub.add_argument("--checkpoint", default=None,
                     help="start from these weights (a .safetensors file or a torch state dict) (default: the "
                          "model's own weights: random for a built-in model, the folder's for hf:)")
    sub.add_argument("--batch-size", type=integer(1), default=32, help="mini-batch size")


def _recipes() -> str:
    return f"{SMALL_MODEL_RECIPE.lr:g} for built-in models, {TRANSFORMER_RECIPE.lr:g} for hf: models"


def _mfac_options(sub, prefix: str = "") -> None:
    """MFAC's memory settings; left out, they come from the model's recipe (mfac.defaults)."""
    small, big = SMALL_MODEL_RECIPE, TRANSFORMER_RECIPE
    sub.add_argument("--density", type=number(0, 1, low_open=True), default=None,
                     help=f"{prefix}MFAC: fraction of each gradient the window keeps (below 1: a compressed window) "
                          f"(default: {small.density:g} for built-in models, {big.density:g} for hf: models)")
    sub.add_argument("--window-dtype", choices=WINDOW_DTYPES, default=None,
                     help=f"{prefix}MFAC: the dtype the window stores gradients in (default: float32 for built-in "
                          f"models, bfloat16 for hf: models)")
    sub.add_argument("--max-grad-norm", type=number(0, FLOAT32_MAX), default=None,
                     help=f"{prefix}MFAC: clip each gradient to this norm before the window sees it; 0: no clipping "
                          f"(default: {small.max_grad_norm or 0:g} for built-in models, {big.max_grad_norm or 0:g} "
                          f"for hf: models, where training without it stalls)")


def _add_demo(commands) -> None:
    sub = commands.add_parser("demo", help="the main job: train with MFAC/Adam/SGD, prune with OBS/magnitude",
                              formatter_class=_Formatter,
                              description="Train an MLP on scikit-learn's digits with MFAC, Adam and SGD, prune the "
                                          "MFAC-trained model one-shot with OBS and magnitude (50-95% and 2:4), "
                                          "fine-tune the 90% OBS model, and write report.json, report.md and plots.")
    sub.add_argument("--quick", action="store_true", help="a shorter run (under a minute)")
    _output_options(sub)


def _add_train(commands) -> None:
    small, big = SMALL_MODEL_RECIPE, TRANSFORMER_RECIPE
    sub = commands.add_parser("train", help="train a built-in model or an hf: model (resumable)",
                              formatter_class=_Formatter,
                              description="Train a built-in model, or fine-tune a local Hugging Face model (hf:PATH) "
                                          "on text. MFAC's settings default to the model's recipe (mfac.defaults: "
                                          "SMALL_MODEL_RECIPE for built-in models, TRANSFORMER_RECIPE for hf: "
                                          "models); the optimizer's memory and the size of a checkpoint are printed "
                                          "before training, and a run that cannot fit in memory is refused. A "
                                          "checkpoint (model, optimizer with its window, data position, random "
                                          "state) is written atomically to --out every --checkpoint-every steps; "
                                          "`mfac train --resume DIR` continues a stopped or killed run and ends with "
                                          "the same model, bit for bit, as a run that was never interrupted.")
    _model_data_options(sub)
    sub.add_argument("--optimizer", default="mfac", choices=OPTIMIZERS, help="the optimizer")
    sub.add_argument("--lr", type=LEARNING_RATE, default=None, help=f"learning rate (default: {_recipes()})")
    sub.add_argument("--momentum", type=number(0, 1, high_open=True), default=None,
                     help=f"momentum of MFAC and SGD (default: {small.momentum:g} for built-in models, "
                          f"{big.momentum:g} for hf: models)")
    sub.add_argument("--weight-decay", type=number(0, FLOAT32_MAX), default=0.0, help="weight decay (L2)")
    sub.add_argument("--window", type=integer(1), default=None,
                     help=f"MFAC: gradients in the window (default: {small.window} for built-in models, {big.window} "
                          f"for hf: models)")
    sub.add_argument("--damp", type=DAMP, default=None,
                     help=f"MFAC: damping lambda (default: {small.damp:g} for built-in models, {big.damp:g} for hf: "
                          f"models)")
    _mfac_options(sub)
    sub.add_argument("--steps", type=integer(1), default=500, help="training steps")
    _checkpoint_options(sub, "train")
    _output_options(sub)
    # `mfac train --resume` tells the settings the user gave from these, without the parser.
    sub.set_defaults(option_defaults=vars(sub.parse_args([])))


def _checkpoint_options(sub, command: str) -> None:
    gradual = "--gradual " if command == "prune" else ""
    sub.add_argument("--checkpoint-every", type=integer(0), default=CHECKPOINT_EVERY,
                     help=f"{gradual.strip() + ': ' if gradual else ''}write a resumable checkpoint to --out every N "
                          f"steps and at the end (0: no checkpoints; the run cannot be resumed)")
    sub.add_argument("--resume", default=None, metavar="DIR",
                     help=f"continue the {gradual}run recorded in DIR, its --out folder (its settings are used; "
                          f"--steps may extend it) (default: start a new run)")


def _add_prune(commands) -> None:
    sub = commands.add_parser("prune", help="prune a model: weights or whole structures, one-shot or gradual",
                              formatter_class=_Formatter,
                              description="Prune a trained built-in model (--checkpoint) or an hf: model with OBS or "
                                          "magnitude: single weights (one-shot, or --gradual while training, "
                                          "resumable; the pruned weights are also written compactly, values plus a "
                                          "bitmask) or whole neurons, channels and heads (--structure, one-shot; "
                                          "--compact writes the smaller model). Writes pruned.safetensors (hf: "
                                          "models: a model/ folder), masks.safetensors, report.json and report.md; "
                                          "the report gives per-layer sparsity, parameters, FLOPs per sample, size "
                                          "on disk and measured latency before and after.")
    _model_data_options(sub)
    sub.add_argument("--allow-untrained", action="store_true",
                     help="one-shot: prune a built-in model without --checkpoint, that is its random initial weights")
    sub.add_argument("--method", default="obs", choices=["obs", "magnitude"],
                     help="obs: second order (M-FAC inverse Fisher); magnitude: |w|, or with --structure the L2 "
                          "norm of each structure")
    sub.add_argument("--sparsity", type=number(0, 1, high_open=True), default=0.9,
                     help="fraction of weights to remove (with --structure: fraction of the structures)")
    sub.add_argument("--pattern", default=None, type=nm_pattern, metavar="N:M",
                     help="N:M semi-structured sparsity, e.g. 2:4: N of every M consecutive weights of a row are "
                          "removed (one-shot; overrides --sparsity) (default: none, unstructured)")
    sub.add_argument("--scope", default="global", choices=["global", "layer"],
                     help="global: one ranking over all layers (with --structure: per kind); layer: the same "
                          "fraction in every layer")
    _structure_options(sub)
    _obs_options(sub)
    sub.add_argument("--calibrate-bn", type=integer(0), default=0,
                     help="re-estimate BatchNorm statistics on this many training batches, before and after pruning")
    _gradual_options(sub)
    _output_options(sub)
    sub.set_defaults(option_defaults=vars(sub.parse_args([])))


def _structure_options(sub) -> None:
    """Structured pruning and compaction."""
    sub.add_argument("--structure", type=structure_list, default=None, metavar="KINDS",
                     help="remove whole structures instead of single weights (one-shot): neurons (hidden units of "
                          "Linear layers, a transformer's feed-forward neurons), channels (convolution channels), "
                          "heads (attention heads), or a comma list such as heads,neurons; for mlp, cnn, resnet20 "
                          "and hf: BERT-family encoders (default: none, single weights)")
    sub.add_argument("--compact", action="store_true",
                     help="with --structure: also write the model rebuilt without the removed structures, smaller "
                          "and faster (compacted.safetensors for built-in models, a compacted/ folder for hf: models)")
    sub.add_argument("--latency-runs", type=integer(1), default=LATENCY_RUNS,
                     help="timed forward passes of one --batch-size batch for the latency in the report (the "
                          "median, after 3 warm-up passes), before and after a one-shot prune")


def _obs_options(sub) -> None:
    """How OBS estimates and inverts the Fisher."""
    sub.add_argument("--num-grads", type=integer(1), default=None,
                     help=f"gradients per inverse, at most what the training data holds (default: {PRUNE_NUM_GRADS} "
                          f"one-shot, {GRADUAL_NUM_GRADS} per pruning step with --gradual, or fewer when the data "
                          f"holds fewer)")
    sub.add_argument("--per-sample", action="store_true", help="one gradient per sample instead of per batch")
    sub.add_argument("--damp", type=DAMP, default=None, help="an absolute damping lambda (default: relative damping)")
    sub.add_argument("--relative-damp", type=number(0, FLOAT32_MAX, low_open=True), default=None,
                     help=f"lambda as a fraction of the mean Fisher diagonal (default {PRUNE_RELATIVE_DAMP:g} when "
                          f"--damp is not given)")
    sub.add_argument("--block-size", type=integer(0), default=PRUNE_BLOCK_SIZE,
                     help="block size of the inverse (0: one block, the exact inverse)")
    sub.add_argument("--recompute", type=integer(1), default=None,
                     help=f"OBS sub-steps with fresh gradients (default {PRUNE_RECOMPUTE} one-shot, "
                          f"{GRADUAL_RECOMPUTE} per pruning step with --gradual)")


def _gradual_options(sub) -> None:
    """Pruning while training, on GradualPruner's schedule."""
    small, big = SMALL_MODEL_RECIPE, TRANSFORMER_RECIPE
    sub.add_argument("--gradual", action="store_true",
                     help="prune while training, on the cubic schedule of GradualPruner (and of "
                          "mfac.hf.PruningCallback), instead of one-shot")
    sub.add_argument("--steps", type=integer(1), default=200, help="--gradual: training steps")
    sub.add_argument("--optimizer", default="adam", choices=OPTIMIZERS,
                     help=f"--gradual: the optimizer (MFAC: the model's recipe, window {small.window} and damp "
                          f"{small.damp:g} for built-in models, window {big.window} and damp {big.damp:g} for hf: "
                          f"models; momentum {small.momentum:g} for MFAC and SGD on built-in models)")
    sub.add_argument("--lr", type=LEARNING_RATE, default=None,
                     help=f"--gradual: learning rate (default: {GRADUAL_LR:g} for built-in models, {big.lr:g} for "
                          f"hf: models)")
    _mfac_options(sub, "--gradual --optimizer mfac: ")
    sub.add_argument("--prune-start", type=integer(0), default=None,
                     help="--gradual: first pruning step (default: 10%% of --steps)")
    sub.add_argument("--prune-end", type=integer(0), default=None,
                     help="--gradual: step at which --sparsity is reached (default: 70%% of --steps)")
    sub.add_argument("--prune-every", type=integer(1), default=None,
                     help="--gradual: steps between pruning steps (default: an eighth of the pruning span)")
    _checkpoint_options(sub, "prune")


def _add_bench(commands) -> None:
    sub = commands.add_parser("bench", help="run the benchmark scripts' quick mode (a few minutes)",
                              formatter_class=_Formatter,
                              description="Run the quick mode of three benchmark scripts, one after the other, and "
                                          "print their tables: benchmarks/fisher.py --quick (the window's products "
                                          "and pushes against a dense inverse), optimizer.py --quick --part 1 (MFAC, "
                                          "Adam and SGD on digits) and pruning.py --quick --part digits (one-shot "
                                          "OBS and magnitude on digits); a few minutes on a laptop CPU. Each script "
                                          "explains its own columns. The scripts are not installed with the "
                                          "package: they come from a source checkout of mfac (git clone, then pip "
                                          "install -e . there), found by itself, or named with --benchmarks DIR.")
    sub.add_argument("--benchmarks", default=None, metavar="DIR",
                     help="the benchmarks/ folder of a source checkout of mfac (default: the one in the checkout "
                          "this mfac is installed from, as by pip install -e .; without one, mfac bench exits with "
                          "status 2 and says so)")
