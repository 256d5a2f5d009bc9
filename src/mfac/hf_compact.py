"""Saving and loading compacted Hugging Face encoders (needs ``pip install "mfac-torch[hf]"``).

A Hugging Face config describes one feed-forward width and one head count for every layer, with a
head size of hidden_size / num_attention_heads. After :func:`mfac.prune.compact`:

* feed-forward neurons pruned to the same width in every layer (``scope="layer"``), no head removed:
  the config can say so; :func:`save_compacted` writes a folder that plain transformers loads
  (``AutoModelForSequenceClassification.from_pretrained``).
* widths that differ between layers, or removed heads (fewer heads of the same size): the config
  cannot say so; the folder records the shapes in ``mfac_compacted`` and loads with
  :func:`load_compacted`, which builds the model from its config, shrinks every layer to the shapes
  of the saved tensors and loads them. It runs no code from the folder: only transformers' own
  classes, chosen by the config's ``architectures``, and tensors read from safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import load_weights
from .prune.compact import shrink_to_state
from .prune.structures import find_structures

__all__ = ["save_compacted", "load_compacted"]

_WIDTH_KEYS = {"bert": "intermediate_size", "distilbert": "hidden_dim"}  # the FFN width in each family's config


def _widths(model) -> tuple[dict[str, int], dict[str, int]]:
    """(neurons per FFN group, heads per attention group) as the model is now."""
    groups = find_structures(model, ("neurons", "heads"))
    neurons = {g.name: g.count for g in groups if g.kind == "neurons"}
    heads = {g.name: g.count for g in groups if g.kind == "heads"}
    return neurons, heads


def _width_key(config) -> str | None:
    return _WIDTH_KEYS.get("distilbert" if config.model_type == "distilbert" else "bert")


def _head_key(config) -> str:
    return "n_heads" if config.model_type == "distilbert" else "num_attention_heads"


def save_compacted(model, folder, tokenizer=None) -> str:
    """Save a compacted (or dense) encoder to ``folder``: safetensors weights and its config (and
    the tokenizer, if given). Returns "transformers" when plain ``from_pretrained`` loads it, or
    "mfac" when it needs :func:`load_compacted` (widths differ between layers, or heads were
    removed)."""
    folder = Path(folder)
    neurons, heads = _widths(model)
    config = model.config
    original_heads = getattr(config, _head_key(config))
    uniform = len(set(neurons.values())) <= 1 and all(count == original_heads for count in heads.values())
    if uniform and neurons:
        setattr(config, _width_key(config), next(iter(neurons.values())))
        if hasattr(config, "mfac_compacted"):
            del config.mfac_compacted
    elif not uniform:
        config.mfac_compacted = {"neurons": neurons, "heads": heads}
    model.save_pretrained(str(folder), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return "transformers" if uniform else "mfac"


def load_compacted(folder, model_class=None):
    """Load a folder written by :func:`save_compacted` (either kind): the model class is
    ``model_class`` or the config's first ``architectures`` entry, which must be a transformers
    class; every layer is shrunk to the saved tensors' shapes before they are loaded (strictly:
    every tensor must fit). Refuses configs that ask for remote code (``auto_map``)."""
    import transformers

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: it is not a saved model folder")
    raw = json.loads(config_path.read_text())
    if "auto_map" in raw:
        raise ValueError(f"{config_path} asks for code from the folder (auto_map); mfac does not run such code")
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if model_class is None:
        names = raw.get("architectures") or []
        model_class = getattr(transformers, names[0], None) if names else None
        if model_class is None:
            raise ValueError(f"{config_path} names no transformers model class in 'architectures' ({names}); pass "
                             f"model_class=")
    weights = folder / "model.safetensors"
    state = load_weights(weights)
    model = model_class(config)
    try:
        shrink_to_state(model, state, ("neurons", "heads"))
    except ValueError as error:
        raise ValueError(f"{weights}: {error}") from None
    model.load_state_dict(state, strict=True)
    return model.eval()
