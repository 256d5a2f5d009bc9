"""Which label of a TSV is which output of an ``hf:`` model's classification head.

A model folder with a fine-tuned sequence-classification head (its config's ``architectures`` names
a ``...ForSequenceClassification`` class) keeps that head: the TSV's labels must be its labels,
the integers 0..num_labels-1 or the names of the config's ``id2label``, each of them present.
Anything else (labels 1/2 for a 0/1 head, a 2-label TSV for a 3-class model, the real numbers of
a regression TSV) is refused with what was found and the fix, instead of loading a random head in
place of the fine-tuned one. ``--new-head`` asks for a fresh head explicitly; a folder without a
classification head (a base model) always gets one. A fresh head has one output per label: integer
labels must then be 0..K-1, and names are numbered in sorted order."""

from __future__ import annotations

import re

from .errors import CliError

__all__ = ["has_classification_head", "head_labels", "fresh_head_labels"]

_INTEGER = re.compile(r"-?\d+")


def has_classification_head(config) -> bool:
    """Whether the folder's weights hold a sequence-classification head (as its config says)."""
    return any(str(name).endswith("ForSequenceClassification") for name in (config.architectures or []))


def _show(values: list[str], limit: int = 8) -> str:
    shown = ", ".join(values[:limit])
    return "{" + shown + (f", ... ({len(values)} in all)" if len(values) > limit else "") + "}"


def _values(task) -> list[str]:
    values = set(task.train_raw) | set(task.test_raw)
    return sorted(values, key=lambda v: (not _INTEGER.fullmatch(v), int(v) if _INTEGER.fullmatch(v) else 0, v))


def _refuse_real_numbers(values: list[str], files: str) -> None:
    reals = []
    for value in values:
        if _INTEGER.fullmatch(value):
            continue
        try:
            float(value)
        except ValueError:
            continue
        reals.append(value)
    if reals:
        raise CliError(f"--data: the labels in {files} include real numbers such as {reals[0]} (a regression "
                       f"task?); mfac trains and prunes classifiers: write class labels as integers 0, 1, ... or "
                       f"as names")


def fresh_head_labels(task) -> tuple[dict[str, int], int, list[str] | None]:
    """(label -> output, number of outputs, the names when the labels are names) for a new head."""
    values = _values(task)
    _refuse_real_numbers(values, task.files)
    if len(values) < 2:
        raise CliError(f"--data: {task.files} has the single label {values[0]!r}; classification needs at least two")
    if all(_INTEGER.fullmatch(v) for v in values):
        numbers = [int(v) for v in values]
        if numbers != list(range(len(numbers))):
            raise CliError(f"--data: the labels in {task.files} are {_show(values)}; integer labels must be 0.."
                           f"{len(numbers) - 1}, one output of the new classification head each: renumber them "
                           f"from 0")
        return {v: int(v) for v in values}, len(values), None
    return {v: i for i, v in enumerate(values)}, len(values), values


def head_labels(task, config, spec: str) -> tuple[dict[str, int], int]:
    """(label -> output, number of outputs) for the fine-tuned head of ``config``; refused unless
    the labels are the head's own, each present."""
    count = int(config.num_labels)
    names = {int(key): str(value) for key, value in (config.id2label or {}).items()}
    values = _values(task)
    _refuse_real_numbers(values, task.files)
    if all(_INTEGER.fullmatch(v) for v in values):
        ids = {v: int(v) for v in values}
    elif all(v in names.values() for v in values):
        ids = {v: next(i for i, name in names.items() if name == v) for v in values}
    else:
        ids = None
    if ids is None or set(ids.values()) != set(range(count)):
        named = ", ".join(f"{i}: {names[i]}" for i in sorted(names)[:8]) if names else ""
        raise CliError(f"--data: the labels in {task.files} are {_show(values)}, but the fine-tuned head of "
                       f"--model {spec} has {count} labels, 0..{count - 1}{f' ({named})' if named else ''}; write the "
                       f"labels as those integers (or names), every one present, or pass --new-head to replace "
                       f"the head with a fresh {len(values)}-label one (its trained weights are then lost)")
    return ids, count
