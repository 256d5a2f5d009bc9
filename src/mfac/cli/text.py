"""Text classification for the commands: ``--model hf:PATH`` (a local Hugging Face model folder with
its tokenizer) and ``--data tsv:PATH`` (tab-separated text with a header row).

A TSV names its label column ``label`` (or ``labels``) and its text column ``sentence``, ``text`` or
``content`` (or the one other column). ``tsv:FOLDER`` takes the folder's ``*train*.tsv`` for training
and its ``*dev*.tsv`` (or ``*valid*.tsv``) for evaluation, as SST-2 is laid out; ``tsv:FILE`` keeps a
seeded fifth of the file for evaluation. Labels are integers, or strings numbered in sorted order.
Needs the ``[hf]`` extra.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import CliError, usage_errors

TEXT_COLUMNS = ("sentence", "text", "content")
EVAL_SENTENCES = 2048  # training sentences on which the train loss is reported (the whole set can be large)


@dataclass
class TextTask:
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    num_labels: int
    description: str


def _read_tsv(path: Path) -> tuple[list[str], list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if len(rows) < 2:
        raise ValueError(f"{path} needs a header row and at least one example")
    header = [name.strip().lower() for name in rows[0]]
    label_at = next((i for i, name in enumerate(header) if name in ("label", "labels")), None)
    if label_at is None:
        raise ValueError(f"{path}: no 'label' column in the header {rows[0]}")
    text_at = next((i for i, name in enumerate(header) if name in TEXT_COLUMNS), None)
    if text_at is None:
        others = [i for i in range(len(header)) if i != label_at]
        if len(others) != 1:
            raise ValueError(f"{path}: name the text column one of {', '.join(TEXT_COLUMNS)} (header {rows[0]})")
        text_at = others[0]
    texts, labels = [], []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"{path} line {number}: {len(row)} columns, the header has {len(header)}")
        texts.append(row[text_at])
        labels.append(row[label_at].strip())
    return texts, labels


def load_text_task(spec: str, seed: int, test_fraction: float = 0.2) -> TextTask:
    """The task of ``--data tsv:PATH`` (see the module docstring)."""
    kind, _, path = spec.partition(":")
    if kind != "tsv" or not path:
        raise CliError(f"--data {spec!r}: a Hugging Face model takes text data, tsv:PATH")
    with usage_errors(f"--data {spec}: "):
        folder = Path(path)
        if folder.is_dir():
            train = sorted(folder.glob("*train*.tsv"))
            test = sorted(folder.glob("*dev*.tsv")) or sorted(folder.glob("*valid*.tsv"))
            if not train or not test:
                raise FileNotFoundError(f"{folder} needs a *train*.tsv and a *dev*.tsv (or *valid*.tsv) file")
            train_texts, train_raw = _read_tsv(train[0])
            test_texts, test_raw = _read_tsv(test[0])
            description = f"{train[0].name} / {test[0].name} in {folder}"
        elif folder.is_file():
            texts, raw = _read_tsv(folder)
            order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
            n_test = max(1, int(len(texts) * test_fraction))
            if len(texts) - n_test < 1:
                raise ValueError(f"{folder} has too few examples to keep {n_test} for evaluation")
            test_texts, test_raw = [texts[i] for i in order[:n_test]], [raw[i] for i in order[:n_test]]
            train_texts, train_raw = [texts[i] for i in order[n_test:]], [raw[i] for i in order[n_test:]]
            description = f"{folder.name} (a seeded {test_fraction:.0%} held out)"
        else:
            raise FileNotFoundError(f"no such file or folder: {folder}")
        names = sorted(set(train_raw) | set(test_raw), key=lambda v: (not v.lstrip("-").isdigit(), v))
        if all(v.lstrip("-").isdigit() for v in names):
            ids = {v: int(v) for v in names}
            if min(ids.values()) < 0:
                raise ValueError("integer labels must be >= 0")
        else:
            ids = {v: i for i, v in enumerate(names)}
        num_labels = max(ids.values()) + 1
        if num_labels < 2:
            raise ValueError("the data has a single label; classification needs at least two")
    return TextTask(train_texts, [ids[v] for v in train_raw], test_texts, [ids[v] for v in test_raw], num_labels,
                    f"{description}: {len(train_texts):,} training and {len(test_texts):,} evaluation texts, "
                    f"{num_labels} labels")


def load_hf_model(spec: str, num_labels: int):
    """(model, tokenizer) from ``hf:PATH``, a local folder; never downloads."""
    path = Path(spec.partition(":")[2])
    if not (path / "config.json").is_file():
        raise CliError(f"--model {spec}: {path} is not a Hugging Face model folder (no config.json there)")
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import transformers
    except ImportError:
        raise CliError("--model hf:PATH needs Hugging Face Transformers: pip install \"mfac-torch[hf]\"") from None
    with usage_errors(f"--model {spec}: "):
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # the new task head's "newly initialized" notice
        try:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                str(path), num_labels=num_labels, local_files_only=True, ignore_mismatched_sizes=True)
        finally:
            transformers.logging.set_verbosity(verbosity)
    return model, tokenizer


class TextBatches:
    """Tokenized, padded dict batches with labels, made on demand from index batches."""

    def __init__(self, tokenizer, texts: list[str], labels: list[int], max_length: int):
        self.tokenizer, self.texts, self.labels, self.max_length = tokenizer, texts, labels, max_length

    def batch(self, indices) -> dict:
        chosen = [int(i) for i in indices]
        batch = dict(self.tokenizer([self.texts[i] for i in chosen], padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt"))
        batch["labels"] = torch.tensor([self.labels[i] for i in chosen])
        return batch

    def in_order(self, batch_size: int, limit: int | None = None) -> list[dict]:
        count = len(self.texts) if limit is None else min(limit, len(self.texts))
        return [self.batch(range(start, min(count, start + batch_size))) for start in range(0, count, batch_size)]


def model_loss(model, batch):
    return model(**batch).loss


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict]) -> tuple[float, float]:
    """(mean loss, accuracy) over ``batches``, in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for batch in batches:
        output = model(**batch)
        size = len(batch["labels"])
        total_loss += float(output.loss) * size
        correct += int((output.logits.argmax(-1) == batch["labels"]).sum())
        count += size
    model.train(was_training)
    return total_loss / count, correct / count


def save_hf(model, tokenizer, folder: Path) -> None:
    """A plain Hugging Face folder (safetensors weights, config, tokenizer)."""
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
