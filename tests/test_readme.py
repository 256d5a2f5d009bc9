"""The README's Python examples run as written (in order, sharing one namespace)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)  # the examples write files
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    masks, model = namespace["masks"], namespace["model"]
    assert abs(masks.sparsity() - 0.9) < 1e-3
    assert (tmp_path / "opt.pt").exists() and (tmp_path / "window.pt").exists()
    assert all((p[~masks[n]] == 0).all() for n, p in model.named_parameters() if n in masks)
    bert_masks = namespace["bert_masks"]  # the transformer example: dict batches, streamed blocks
    assert abs(bert_masks.sparsity() - 0.7) < 1e-3
    assert abs(namespace["pruning"].sparsity - 0.8) < 1e-3  # the Trainer example
    assert (tmp_path / "pruned-bert" / "config.json").exists()
