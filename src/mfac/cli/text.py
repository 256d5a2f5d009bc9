"""Text classification for the commands: ``--model hf:PATH`` (a local Hugging Face model folder with
its tokenizer) and ``--data tsv:PATH`` (tab-separated text with a header row).

A TSV names its label column ``label`` (or ``labels``) and its text column ``sentence``, ``text`` or
``content`` (or the one other column). ``tsv:FOLDER`` takes the folder's ``*train*.tsv`` for training
and its ``*dev*.tsv`` (or ``*valid*.tsv``) for evaluation, as SST-2 is laid out; ``tsv:FILE`` keeps a
seeded fifth of the file for evaluation. Labels are integers or names; :mod:`mfac.cli.labels` matches them
to the model's classification head (``--new-head`` asks for a fresh one).
Needs the ``[hf]`` extra.
"""

from __future__ import annotations

import csv
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import load_weights
from .errors import CliError, usage_errors
from .labels import fresh_head_labels, has_classification_head, head_labels

TEXT_COLUMNS = ("sentence", "text", "content")
EVAL_SENTENCES = 2048  # training sentences on which the train loss is reported (the whole set can be large)


@dataclass
class TextTask:
    """The texts and their labels as written in the files; :func:`load_hf_model` numbers the labels
    (``train_labels``, ``test_labels``, ``num_labels``) once it knows the model's head."""

    train_texts: list[str]
    train_raw: list[str]
    test_texts: list[str]
    test_raw: list[str]
    files: str  # the TSV file(s) the labels come from, for messages
    eval_name: str  # what the evaluation texts are: "dev" (a dev/valid file) or "held-out"
    description: str = ""
    train_labels: list[int] = field(default_factory=list)
    test_labels: list[int] = field(default_factory=list)
    num_labels: int = 0

    def set_labels(self, ids: dict[str, int], num_labels: int) -> None:
        self.train_labels = [ids[v] for v in self.train_raw]
        self.test_labels = [ids[v] for v in self.test_raw]
        self.num_labels = num_labels
        self.description = (f"{self.files}: {len(self.train_texts):,} training and {len(self.test_texts):,} "
                            f"{self.eval_name} texts, {num_labels} labels")


def _read_tsv(path: Path) -> tuple[list[str], list[str]]:
    csv.field_size_limit(2**31 - 1)  # a long text is truncated by --max-length, not refused by the reader
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            rows = list(reader)
        except csv.Error as error:
            raise ValueError(f"{path} line {reader.line_num}: {error}") from None
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
    """The task of ``--data tsv:PATH`` (see the module docstring), its labels not yet numbered."""
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
            return TextTask(train_texts, train_raw, test_texts, test_raw, f"{train[0].name} / {test[0].name} in "
                                                                         f"{folder}", "dev")
        if folder.is_file():
            texts, raw = _read_tsv(folder)
            order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
            n_test = max(1, int(len(texts) * test_fraction))
            if len(texts) - n_test < 1:
                raise ValueError(f"{folder} has too few examples to keep {n_test} for evaluation")
            return TextTask([texts[i] for i in order[n_test:]], [raw[i] for i in order[n_test:]],
                            [texts[i] for i in order[:n_test]], [raw[i] for i in order[:n_test]],
                            f"{folder} (a seeded {test_fraction:.0%} held out)", "held-out")
        raise FileNotFoundError(f"no such file or folder: {folder}")


def quiet_transformers(transformers) -> None:
    """No loading or saving progress bars from transformers (or the hub) in the command's output."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    transformers.utils.logging.disable_progress_bar()


def load_hf_model(spec: str, task: TextTask, new_head: bool = False):
    """(model, tokenizer) from ``hf:PATH``, a local folder; never downloads. Numbers the task's
    labels for the model's head (:mod:`mfac.cli.labels`): a fine-tuned head is kept and the labels
    must fit it; a base model, or ``new_head``, gets a fresh head with one output per label."""
    path = Path(spec.partition(":")[2])
    if not (path / "config.json").is_file():
        raise CliError(f"--model {spec}: {path} is not a Hugging Face model folder (no config.json there)")
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import transformers
    except ImportError:
        raise CliError("--model hf:PATH needs Hugging Face Transformers: pip install \"mfac-torch[hf]\"") from None
    quiet_transformers(transformers)
    with usage_errors(f"--model {spec}: "), _missing_files(spec):
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    fine_tuned = has_classification_head(config)
    options = {}
    if fine_tuned and not new_head:
        ids, count = head_labels(task, config, spec)
    else:
        ids, count, names = fresh_head_labels(task)
        options = dict(num_labels=count, ignore_mismatched_sizes=fine_tuned)  # the old head is replaced on purpose
        if names:
            options.update(id2label=dict(enumerate(names)), label2id={name: i for i, name in enumerate(names)})
    task.set_labels(ids, count)
    with usage_errors(f"--model {spec}: "), _missing_files(spec):
        if not any(path.glob("*.safetensors")):  # torch weight files are read without running code first
            for weights in sorted(path.glob("pytorch_model*.bin")):
                load_weights(weights)
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # the new task head's "newly initialized" notice
        try:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                str(path), local_files_only=True, **options)
        finally:
            transformers.logging.set_verbosity(verbosity)
    if fine_tuned and new_head:
        _reset_head(model)
    return model, tokenizer


@contextmanager
def _missing_files(spec: str):
    """transformers' OSError for a folder without its weights or tokenizer files: a usage error."""
    try:
        yield
    except OSError as error:
        if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            raise  # usage_errors words these
        raise CliError(f"--model {spec}: {' '.join(str(error).split())[:300]}") from None


def _reset_head(model: nn.Module) -> None:
    """Fresh weights for everything outside the base model (the task head), even where its shape
    matched the folder's and its trained weights were loaded."""
    for name, child in model.named_children():
        if name != getattr(model, "base_model_prefix", None):
            for module in child.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()


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
