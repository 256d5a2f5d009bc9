"""Pruning masks: which weights are kept, and how to keep the pruned ones at exactly zero."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["Masks", "MaskHandle"]


def _split_name(name: str) -> tuple[str, str]:
    module, _, tensor = name.rpartition(".")
    return module, tensor


def parameter_by_name(model: nn.Module, name: str) -> nn.Parameter:
    """The Parameter called ``name`` (e.g. "0.weight"), also while a mask is attached to it."""
    module_name, tensor = _split_name(name)
    try:
        module = model.get_submodule(module_name)
    except AttributeError as error:
        raise KeyError(f"the model has no module {module_name!r} (from parameter name {name!r})") from error
    if parametrize.is_parametrized(module, tensor):
        return getattr(module.parametrizations, tensor).original
    value = getattr(module, tensor, None)
    if not isinstance(value, nn.Parameter):
        raise KeyError(f"the model has no parameter {name!r}")
    return value


class _KeepMasked(nn.Module):
    """Parametrization weight = original * mask: pruned entries are exactly zero in every forward,
    and their gradients are zero, whatever the optimizer does to the stored original."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


class MaskHandle:
    """Returned by :meth:`Masks.attach`; ``remove()`` detaches the masks and leaves plain
    parameters (same objects, so optimizers keep working) with the pruned entries at zero."""

    def __init__(self, model: nn.Module, names: list[str]):
        self._model, self._names = model, names

    def remove(self) -> None:
        for name in self._names:
            module_name, tensor = _split_name(name)
            module = self._model.get_submodule(module_name)
            if parametrize.is_parametrized(module, tensor):
                parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
        self._names = []


def _checked(masks) -> dict[str, torch.Tensor]:
    """A name -> bool tensor dict, or TypeError naming the offending entry."""
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a mapping of parameter name -> bool tensor, got {type(masks).__name__}")
    out = {}
    for name, mask in masks.items():
        if not isinstance(name, str):
            raise TypeError(f"mask names must be strings (parameter names), got {name!r}")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask for {name!r} must be a bool tensor, got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        out[name] = mask
    return out


class Masks(Mapping):
    """Parameter name -> bool tensor of the parameter's shape (True = kept, False = pruned)."""

    def __init__(self, masks: Mapping[str, torch.Tensor]):
        self._masks = _checked(masks)

    @classmethod
    def dense(cls, params: Mapping[str, torch.Tensor]) -> "Masks":
        """Masks that keep every entry of the given parameters."""
        return cls({name: torch.ones_like(p, dtype=torch.bool) for name, p in params.items()})

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def sparsity(self, name: str | None = None) -> float:
        """Fraction of pruned entries over all masked tensors, or in tensor ``name``."""
        masks = [self._masks[name]] if name is not None else list(self._masks.values())
        total = sum(m.numel() for m in masks)
        return sum(int((~m).sum()) for m in masks) / max(total, 1)

    def per_tensor_sparsity(self) -> dict[str, float]:
        return {name: self.sparsity(name) for name in self._masks}

    def _check_model(self, model: nn.Module) -> list[nn.Parameter]:
        params = []
        for name, mask in self._masks.items():
            param = parameter_by_name(model, name)
            if param.shape != mask.shape:
                raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)} but the parameter has "
                                 f"{tuple(param.shape)}")
            params.append(param)
        return params

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero the pruned entries of the model's parameters, once."""
        for param, mask in zip(self._check_model(model), self._masks.values()):
            param.mul_(mask.to(param.device, param.dtype))

    def attach(self, model: nn.Module) -> MaskHandle:
        """Keep the pruned entries at exactly zero through any later training, with any optimizer:
        each masked weight becomes ``original * mask`` (a torch parametrization), so forward passes
        see zeros and gradients at pruned entries are zero. The parameters stay the same objects,
        so an optimizer created before or after works. While attached, a module's parameter is
        listed as ``<module>.parametrizations.weight.original``; ``handle.remove()`` makes the
        model plain again (e.g. for export) with the zeros in place."""
        self._check_model(model)
        self.apply(model)
        names = []
        for name, mask in self._masks.items():
            module_name, tensor = _split_name(name)
            module = model.get_submodule(module_name)
            if parametrize.is_parametrized(module, tensor):
                raise RuntimeError(f"{name!r} already has a mask attached; remove that handle first")
            param = getattr(module, tensor)
            parametrize.register_parametrization(module, tensor, _KeepMasked(mask.to(param.device, param.dtype)))
            names.append(name)
        return MaskHandle(model, names)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: mask.clone() for name, mask in self._masks.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the masks by those of ``state``. When masks are held, the state must name the same
        tensors with the same shapes. Checked before anything changes; raises ValueError/TypeError."""
        masks = _checked(state)
        if self._masks:
            if set(masks) != set(self._masks):
                raise ValueError(f"mask state names {sorted(masks)[:5]}..., but these masks are for "
                                 f"{sorted(self._masks)[:5]}...; load masks saved for the same parameters")
            for name, mask in masks.items():
                if mask.shape != self._masks[name].shape:
                    raise ValueError(f"mask state for {name!r} has shape {tuple(mask.shape)}, expected "
                                     f"{tuple(self._masks[name].shape)}")
        self._masks = {name: mask.clone() for name, mask in masks.items()}

    def __repr__(self) -> str:
        return f"Masks({len(self)} tensors, sparsity {self.sparsity():.2%})"
