"""Compacted built-in models (``mfac prune --structure ... --compact``): written as one safetensors
file that says how to rebuild the model, and read back without running code from the file.

``compacted.safetensors`` holds the compacted model's state dict; its metadata entry
``mfac.compacted`` (JSON) names the built-in model (mlp, cnn, resnet20), the input shape and the
number of classes it was built for, and the structures left in each layer (``structure_sizes``:
group name -> [before, after]). :func:`load_compacted_model` builds that model, shrinks each layer
to the saved tensors' shapes (:func:`shrink_to`) and loads the weights strictly::

    from mfac.cli.compacted import load_compacted_model
    model = load_compacted_model("RUN/compacted.safetensors")   # an nn.Module in eval mode

The same in plain mfac, for any model whose structures :func:`mfac.prune.find_structures` finds::

    state = mfac.checkpoint.load_weights(path); shrink_to(model, state); model.load_state_dict(state)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CorruptFileError, atomic_write_bytes, load_weights, safetensors_torch
from ..prune import find_structures
from ..prune.compact import keep_structures
from ..prune.structures import KINDS
from .tasks import Task, build_model

__all__ = ["METADATA_KEY", "save_compacted_model", "load_compacted_model", "read_recipe", "shrink_to"]

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
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for malformed files
        raise CorruptFileError(f"{path} is not a readable safetensors file ({' '.join(str(error).split())[:120]})"
                               ) from None
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path} is not a compacted model written by mfac prune --compact (no {METADATA_KEY} "
                         f"metadata)")
    recipe = json.loads(metadata[METADATA_KEY])
    if recipe.get("format") != FORMAT:
        raise ValueError(f"{path}: compacted-model format {recipe.get('format')!r} is not {FORMAT}")
    return recipe


def shrink_to(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Shrink every neuron, channel and head group of ``model`` (as
    :func:`mfac.prune.find_structures` finds them) to the number of structures the tensors of
    ``state`` hold, in place, so that ``model.load_state_dict(state)`` fits."""
    for group in find_structures(model, KINDS):
        part = group.params[0]
        saved = state.get(part.name)
        if saved is None:
            raise ValueError(f"the saved weights have no tensor {part.name!r}; they do not belong to this model")
        kept = saved.shape[part.axis] // part.width if saved.dim() > part.axis else 0
        if not 1 <= kept <= group.count or kept * part.width != saved.shape[part.axis]:
            raise ValueError(f"{part.name!r} is saved with shape {tuple(saved.shape)}, which is not a smaller "
                             f"{group.kind} layer of this model (it has {group.count})")
        keep_structures(model, group, torch.arange(kept))


def load_compacted_model(path) -> nn.Module:
    """The compacted built-in model in ``path`` (from ``mfac prune --compact``), in eval mode."""
    recipe = read_recipe(path)
    task = Task(None, tuple(recipe["input_shape"]), int(recipe["num_classes"]), "")
    model = build_model(recipe["model"], task)
    state = load_weights(path)
    shrink_to(model, state)
    model.load_state_dict(state, strict=True)
    return model.eval()
