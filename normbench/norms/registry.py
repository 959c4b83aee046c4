"""The single registry of normalization variants.

A variant is a ``torch.nn.Module`` class registered under a config name; every
class takes ``(num_channels, **kwargs)`` and normalises channels-first input
``(N, C, *)``. Models ask this registry for their layers, so registering a class
(plus one YAML file in ``normbench/conf/norm/``) is all it takes to add a variant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from normbench.errors import UserError

_REGISTRY: dict[str, type] = {}


def register_norm(name: str) -> Callable[[type], type]:
    """Class decorator: make ``cls`` available as ``norm=<name>``."""

    def decorate(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"norm {name!r} is registered twice")
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return decorate


def norm_names() -> list[str]:
    """Registered variant names, in registration order."""
    return list(_REGISTRY)


def get_norm(name: str) -> type:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown norm {name!r}; valid: {', '.join(norm_names())}") from None


@dataclass(frozen=True)
class NormSpec:
    """A variant plus its keyword arguments: call it with a channel count to get a layer.

    Models receive a ``NormSpec`` and never see the variant's name or options.
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def cls(self) -> type:
        return get_norm(self.name)

    @property
    def centers(self) -> bool:
        """Whether the layer subtracts a mean, which makes a preceding bias redundant."""
        return getattr(self.cls, "centers", True)

    @property
    def needs_spatial(self) -> bool:
        """Whether the layer needs spatial dimensions (instance norm on (N, C) is meaningless)."""
        return getattr(self.cls, "needs_spatial", False)

    @property
    def carries_activation(self) -> bool:
        """Whether the layer ends in its own nonlinearity (FRN's TLU, EvoNorm's gate)."""
        return getattr(self.cls, "carries_activation", False)

    def __call__(self, num_channels: int):
        return self.cls(num_channels, **self.kwargs)

    def activation(self):
        """What a model puts after the layer where it would put a ReLU: a ReLU, or nothing
        (``nn.Identity``) when the layer carries its own activation. A module without
        parameters, so state_dict keys are the same either way."""
        from torch import nn

        return nn.Identity() if self.carries_activation else nn.ReLU(inplace=True)
