"""Every ```python block of the README runs on its own, as a reader would paste it.

Each block is one test: it runs in a fresh namespace (no names carried over from an earlier block)
with a fresh temporary folder as the working directory, and the checks below look at the variables
and files that block made. A check is attached to the one block that contains its marker string,
and a separate test fails if a marker no longer matches exactly one block, so a check cannot be
dropped silently when the README changes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def _optimizer(ns, cwd):
    assert (cwd / "opt.pt").exists()
    assert ns["state"]["step"] == 300
    assert ns["opt"].skipped_steps == 0
    assert ns["accuracy"] > 0.9  # the small MLP learns the digits


def _pruning(ns, cwd):
    masks, model = ns["masks"], ns["model"]
    assert abs(masks.sparsity() - 0.9) < 1e-3
    # fine-tuned with the masks attached, then detached: the pruned weights are still exactly zero
    pruned = [n for n, _ in model.named_parameters() if n in masks]
    assert pruned
    assert all((p[~masks[n]] == 0).all() for n, p in model.named_parameters() if n in masks)
    assert ns["accuracy"] > 0.8


def _bert_oneshot(ns, cwd):
    bert_masks, bert = ns["bert_masks"], ns["bert"]
    assert abs(bert_masks.sparsity() - 0.7) < 1e-3
    assert set(bert_masks) == set(ns["encoder"])  # only the encoder's weights were pruned
    params = dict(bert.named_parameters())
    assert all((params[n][~bert_masks[n]] == 0).all() for n in bert_masks)


def _trainer(ns, cwd):
    assert abs(ns["pruning"].sparsity - 0.8) < 1e-3
    assert (cwd / "pruned-bert" / "config.json").exists()
    assert any((cwd / "hf-run").glob("checkpoint-*"))  # save_steps=5: checkpoints were written


def _dcp(ns, cwd):
    assert (cwd / "checkpoint-dcp" / ".metadata").exists()
    assert ns["opt"].fisher.num_grads == 8  # the restored window holds its 8 gradients


def _fisher(ns, cwd):
    assert (cwd / "window.pt").exists()
    assert ns["step"].shape == (20_000,) and torch.isfinite(ns["step"]).all()
    assert torch.isfinite(ns["direction"]).all()
    assert ns["window"].num_grads == 32  # the window keeps only the last 32 of the 128 gradients
    assert (ns["saliency_denominators"] > 0).all()


def _recipe(ns, cwd):
    opt, bert = ns["opt"], ns["bert"]
    assert ns["schedule"].last_epoch == ns["total_steps"]
    assert opt.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in bert.parameters())


def _structured(ns, cwd):
    model = ns["model"]
    assert ns["result"].sizes == {"0": (128, 32)}
    assert model[0].out_features == 32 and model[2].in_features == 32
    assert torch.allclose(model(ns["digits"].test_x), ns["masked_output"], atol=1e-5)
    assert ns["accuracy"] > 0.85


# marker string (occurs in exactly one block) -> check of that block's results
CHECKS = {
    "checkpoint.save(": _optimizer,
    "masks.attach(model)": _pruning,
    "batch_loss=lambda": _bert_oneshot,
    "PruningCallback(": _trainer,
    "dcp.save(": _dcp,
    "SlidingWindowFisherInverse(": _fisher,
    "window_dtype=torch.bfloat16": _recipe,
    "result = compact(model, masks)": _structured,
}


def _checks_for(block):
    return [check for marker, check in CHECKS.items() if marker in block]


def test_every_check_finds_its_block():
    assert len(BLOCKS) >= 7
    for marker in CHECKS:
        assert sum(marker in block for block in BLOCKS) == 1, f"{marker!r} should be in exactly one README block"


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i + 1}" for i in range(len(BLOCKS))])
def test_readme_block_runs_alone(index, tmp_path, monkeypatch):
    block = BLOCKS[index]
    monkeypatch.chdir(tmp_path)  # the examples write files
    namespace = {"__name__": "__main__"}
    exec(compile(block, f"{README} (python block {index + 1})", "exec"), namespace)
    for check in _checks_for(block):
        check(namespace, tmp_path)
