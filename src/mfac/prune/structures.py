"""Structures that can be removed whole: which slices of which parameters form one structure.

A structure is a hidden unit whose removal shrinks layers: a neuron of an MLP (a row of the
producing Linear with its bias, and the matching column of the consuming Linear), a channel of a
CNN (an output channel of a convolution with its bias and BatchNorm entries, and the matching
input channel of the next convolution, or the matching block of inputs of a Linear after Flatten),
an attention head (its rows of the query, key and value projections and its columns of the output
projection). Coupled dimensions (a transformer's hidden size, a ResNet block's output channels,
which residual connections share) are never structures.

A :class:`StructureGroup` describes ``count`` structures of one layer: structure j covers indices
[j * width, (j + 1) * width) along ``axis`` of every :class:`ParamSlice` it lists. Groups are found
by :func:`find_structures` for ``torch.nn.Sequential`` MLPs and CNNs, residual basic blocks
(ResNet-20 and torchvision's BasicBlock), and Hugging Face BERT-family encoders (BERT, MiniLM,
RoBERTa, DistilBERT); other models pass their groups explicitly::

    StructureGroup("fc1", "neurons", count=256,
                   params=(ParamSlice("fc1.weight", 0), ParamSlice("fc1.bias", 0), ParamSlice("fc2.weight", 1)))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ParamSlice", "StructureGroup", "KINDS", "find_structures", "structure_coordinates"]

KINDS = ("neurons", "channels", "heads")

# Modules that act on each feature (or channel) separately: a structure passes through them.
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardswish,
                nn.Dropout, nn.Identity)
_CHANNELWISE = _ELEMENTWISE + (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout2d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class ParamSlice:
    """Structure j of a group covers indices [j * width, (j + 1) * width) along ``axis`` of the
    parameter (or buffer) ``name`` (as in ``model.named_parameters()``)."""

    name: str
    axis: int
    width: int = 1


@dataclass(frozen=True)
class StructureGroup:
    """``count`` structures of one kind that shrink one layer together.

    ``params``: the parameter slices of every structure (they enter the Fisher and are removed).
    ``buffers``: buffers sliced with them on compaction (BatchNorm running statistics).
    ``attributes``: (module name, attribute, per structure): on compaction the attribute becomes the
    number of structures kept times ``per structure`` (e.g. a head count, or heads * head size).
    """

    name: str
    kind: str
    count: int
    params: tuple[ParamSlice, ...]
    buffers: tuple[ParamSlice, ...] = ()
    attributes: tuple[tuple[str, str, int], ...] = ()

    def check(self, model: nn.Module) -> None:
        """Raise ValueError naming what does not fit: an unknown kind, a missing parameter, or a
        slice whose axis does not hold ``count * width`` entries."""
        if self.kind not in KINDS:
            raise ValueError(f"structure group {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"structure group {self.name!r}: count must be an int >= 1, got {self.count!r}")
        tensors = dict(model.named_parameters())
        tensors.update(model.named_buffers())
        for part in self.params + self.buffers:
            tensor = tensors.get(part.name)
            if tensor is None:
                raise ValueError(f"structure group {self.name!r} names {part.name!r}, which the model does not have")
            if not -tensor.dim() <= part.axis < tensor.dim() or tensor.shape[part.axis] != self.count * part.width:
                raise ValueError(f"structure group {self.name!r}: {part.name!r} has shape {tuple(tensor.shape)}, "
                                 f"which has no axis {part.axis} of {self.count} x {part.width} entries")


def structure_coordinates(shape: torch.Size, part: ParamSlice, count: int) -> torch.Tensor:
    """Flat indices into a tensor of ``shape`` of every structure: (count, entries per structure)."""
    flat = torch.arange(shape.numel()).view(shape).movedim(part.axis, 0)
    return flat.reshape(count, -1)


# Discovery ----------------------------------------------------------------------------------------------


def find_structures(model: nn.Module, kinds) -> list[StructureGroup]:
    """The structure groups of ``kinds`` ("neurons", "channels", "heads", or several) in ``model``.

    Recognised: Hugging Face BERT-family encoders (feed-forward neurons, attention heads), residual
    basic blocks (the middle channels), and every ``nn.Sequential`` in the model (neurons between
    Linear layers, channels between convolutions or between a convolution and a Linear after
    Flatten). Raises ValueError saying what was found when there is nothing of ``kinds``."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"structure must be one of {KINDS} (or a tuple of them), got {kinds!r}")
    groups = _transformer_groups(model) or _basic_block_groups(model) + _sequential_groups(model)
    chosen = [group for group in groups if group.kind in kinds]
    if not chosen:
        found = sorted({group.kind for group in groups})
        raise ValueError(f"found no {' or '.join(kinds)} to prune in this {type(model).__name__}: "
                         f"{'it has ' + ', '.join(found) if found else 'no structure was recognised'}. "
                         f"Recognised are nn.Sequential MLPs and CNNs, residual basic blocks (conv1/bn1/conv2) and "
                         f"Hugging Face BERT-family encoders; describe other models with groups= "
                         f"(mfac.prune.StructureGroup)")
    return chosen


def _sequential_groups(model: nn.Module) -> list[StructureGroup]:
    groups = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for position, (name, producer) in enumerate(children):
                if isinstance(producer, (nn.Linear, nn.Conv2d)):
                    group = _chain(f"{prefix}.{name}" if prefix else name, producer, children[position + 1:], prefix)
                    if group is not None:
                        groups.append(group)
    return groups


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _chain(producer_name: str, producer: nn.Module, rest: list, prefix: str) -> StructureGroup | None:
    """The group between ``producer`` and the next layer of ``rest`` that reads its outputs
    feature by feature, if only per-feature modules lie between them."""
    conv = isinstance(producer, nn.Conv2d)
    if conv and producer.groups != 1:
        return None
    count = producer.out_channels if conv else producer.out_features
    params = [ParamSlice(f"{producer_name}.weight", 0)]
    if producer.bias is not None:
        params.append(ParamSlice(f"{producer_name}.bias", 0))
    buffers, flattened = [], False
    for name, module in rest:
        full = _qualified(prefix, name)
        if isinstance(module, _BATCHNORMS) and module.num_features == count:
            if module.affine:
                params += [ParamSlice(f"{full}.weight", 0), ParamSlice(f"{full}.bias", 0)]
            if module.track_running_stats:
                buffers += [ParamSlice(f"{full}.running_mean", 0), ParamSlice(f"{full}.running_var", 0)]
        elif isinstance(module, nn.Flatten) and conv and not flattened:
            flattened = True
        elif isinstance(module, _CHANNELWISE if conv and not flattened else _ELEMENTWISE):
            continue
        elif isinstance(module, nn.Linear) and (not conv or flattened) and module.in_features % count == 0:
            width = module.in_features // count
            params.append(ParamSlice(f"{full}.weight", 1, width))
            return StructureGroup(producer_name, "channels" if conv else "neurons", count, tuple(params),
                                  tuple(buffers))
        elif isinstance(module, nn.Conv2d) and conv and not flattened and module.in_channels == count \
                and module.groups == 1:
            params.append(ParamSlice(f"{full}.weight", 1))
            return StructureGroup(producer_name, "channels", count, tuple(params), tuple(buffers))
        else:
            return None
    return None


def _basic_block_groups(model: nn.Module) -> list[StructureGroup]:
    """The free middle channels of residual basic blocks (conv1 -> bn1 -> relu -> conv2 -> bn2, plus
    a shortcut): conv1's outputs are read only by conv2."""
    groups = []
    for prefix, module in model.named_modules():
        conv1, bn1, conv2 = (getattr(module, name, None) for name in ("conv1", "bn1", "conv2"))
        if not (isinstance(conv1, nn.Conv2d) and isinstance(conv2, nn.Conv2d) and isinstance(bn1, nn.BatchNorm2d)
                and hasattr(module, "bn2") and conv1.groups == conv2.groups == 1
                and conv1.out_channels == conv2.in_channels == bn1.num_features and bn1.affine):
            continue
        count = conv1.out_channels
        params = [ParamSlice(_qualified(prefix, "conv1.weight"), 0)]
        if conv1.bias is not None:
            params.append(ParamSlice(_qualified(prefix, "conv1.bias"), 0))
        params += [ParamSlice(_qualified(prefix, "bn1.weight"), 0), ParamSlice(_qualified(prefix, "bn1.bias"), 0),
                   ParamSlice(_qualified(prefix, "conv2.weight"), 1)]
        buffers = ()
        if bn1.track_running_stats:
            buffers = (ParamSlice(_qualified(prefix, "bn1.running_mean"), 0),
                       ParamSlice(_qualified(prefix, "bn1.running_var"), 0))
        groups.append(StructureGroup(_qualified(prefix, "conv1"), "channels", count, tuple(params), buffers))
    return groups


# Hugging Face BERT-family encoders ------------------------------------------------------------------------

# For each family: attribute paths inside one encoder layer (up, down), (query, key, value, output),
# and the attention module's head-count attributes.
_FAMILIES = {
    "bert": dict(up="intermediate.dense", down="output.dense", q="attention.self.query",
                 k="attention.self.key", v="attention.self.value", o="attention.output.dense",
                 attention="attention.self", heads=("num_attention_heads",), head_width=("all_head_size",)),
    "distilbert": dict(up="ffn.lin1", down="ffn.lin2", q="attention.q_lin", k="attention.k_lin",
                       v="attention.v_lin", o="attention.out_lin", attention="attention", heads=("n_heads",),
                       head_width=()),
}


def _encoder_layers(model: nn.Module) -> tuple[str, list[tuple[str, nn.Module]], dict] | None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "electra": "bert", "camembert": "bert",
              "distilbert": "distilbert"}.get(model_type)
    if family is None:
        return None
    for prefix, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and prefix.endswith(("encoder.layer", "transformer.layer")):
            return family, [(_qualified(prefix, str(i)), layer) for i, layer in enumerate(module)], _FAMILIES[family]
    return None


def _transformer_groups(model: nn.Module) -> list[StructureGroup]:
    found = _encoder_layers(model)
    if found is None:
        return []
    _, layers, paths = found
    groups = []
    for prefix, layer in layers:
        def name(path: str, leaf: str) -> str:
            return f"{prefix}.{path}.{leaf}"

        up = layer.get_submodule(paths["up"])
        neurons = [ParamSlice(name(paths["up"], "weight"), 0), ParamSlice(name(paths["down"], "weight"), 1)]
        if up.bias is not None:
            neurons.insert(1, ParamSlice(name(paths["up"], "bias"), 0))
        groups.append(StructureGroup(f"{prefix}.{paths['up']}", "neurons", up.out_features, tuple(neurons)))
        attention = layer.get_submodule(paths["attention"])
        count = getattr(attention, paths["heads"][0])
        width = layer.get_submodule(paths["q"]).out_features // count
        heads = []
        for key in ("q", "k", "v"):
            heads.append(ParamSlice(name(paths[key], "weight"), 0, width))
            if layer.get_submodule(paths[key]).bias is not None:
                heads.append(ParamSlice(name(paths[key], "bias"), 0, width))
        heads.append(ParamSlice(name(paths["o"], "weight"), 1, width))
        attributes = tuple((f"{prefix}.{paths['attention']}", attr, 1) for attr in paths["heads"]) + \
            tuple((f"{prefix}.{paths['attention']}", attr, width) for attr in paths["head_width"])
        groups.append(StructureGroup(f"{prefix}.{paths['attention']}", "heads", count, tuple(heads),
                                     attributes=attributes))
    return groups
