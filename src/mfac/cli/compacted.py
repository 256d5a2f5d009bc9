"""Compacted built-in models (``mfac prune --structure ... --compact``): written as one safetensors
file that says how to rebuild the model, and read back without running code from the file.

``compacted.safetensors`` holds the compacted model's state dict; its metadata entry
``mfac.compacted`` (JSON) names the built-in model (mlp, cnn, resnet20), the input shape and the
number of classes it was built for, and the structures left in each layer (``structure_sizes``:
group name -> [before, after]). :func:`load_compacted_model` builds that model, shrinks each layer
to the saved tensors' shapes (:func:`mfac.prune.compact.shrink_to_state`) and loads the weights strictly::

    from mfac.cli.compacted import load_compacted_model
    model = load_compacted_model("RUN/compacted.safetensors")   # an nn.Module in eval mode

The same in plain mfac, for any model whose structures :func:`mfac.prune.find_structures` finds::

    state = mfac.checkpoint.load_weights(path); shrink_to_state(model, state); model.load_state_dict(state)
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..checkpoint import atomic_write_bytes, load_weights, read_safetensors, safetensors_torch
from ..prune.compact import shrink_to_state
from .tasks import Task, build_model

__all__ = ["METADATA_KEY", "save_compacted_model", "load_compacted_model", "read_recipe"]

METADATA_KEY = "mfac.compacted"
FORMAT = 1


def save_compacted_model(model: nn.Module, path: Path, model_name: str, image_shape: tuple[int, ...],
                         num_classes: int, sizes: dict[str, tuple[int, int]]) -> None:
    """Write the compacted ``model`` (a built-in model ``model_name`` built for ``image_shape`` and
    ``num_classes``) with its rebuilding recipe in the metadata, atomically."""
    recipe = {"format": FORMAT, "model": model_name, "input_shape": list(image_shape), "num_classes": num_classes,
              "structure_sizes": {name: list(pair) for name, pair in sizes.items()}}
    state = {name: value.detach().to("cpu").contiguous().clone() for name, value in model.state_dict().items()}
    atomic_write_bytes(path, safetensors_torch().save(state, metadata={METADATA_KEY: json.dumps(recipe)}))


def read_recipe(path) -> dict:
    """The ``mfac.compacted`` metadata of a file written by :func:`save_compacted_model`."""
    metadata, _ = read_safetensors(path, tensors=False)
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path} is not a compacted model written by mfac prune --compact (no {METADATA_KEY} "
                         f"metadata)")
    recipe = json.loads(metadata[METADATA_KEY])
    if recipe.get("format") != FORMAT:
        raise ValueError(f"{path}: compacted-model format {recipe.get('format')!r} is not {FORMAT}")
    return recipe


def load_compacted_model(path) -> nn.Module:
    """The compacted built-in model in ``path`` (from ``mfac prune --compact``), in eval mode."""
    recipe = read_recipe(path)
    task = Task(None, tuple(recipe["input_shape"]), int(recipe["num_classes"]), "")
    model = build_model(recipe["model"], task)
    state = load_weights(path)
    shrink_to_state(model, state)
    model.load_state_dict(state, strict=True)
    return model.eval()
