"""The model registry: ``model=<name>`` to the builder registered under that name.

Builders take ``(norm, in_channels, num_classes, image_size, **kwargs)``; ``norm`` is a
:class:`~normbench.norms.registry.NormSpec` they call with a channel count, so no model
names a normalization variant.
"""

from __future__ import annotations

from collections.abc import Callable

from normbench.errors import UserError

_MODELS: dict[str, Callable] = {}


def register_model(name: str) -> Callable[[Callable], Callable]:
    """Decorator: make a builder ``fn(norm, in_channels, num_classes, image_size, **kw)``
    available as ``model=<name>``."""

    def decorate(builder: Callable) -> Callable:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = builder
        return builder

    return decorate


def model_names() -> list[str]:
    return list(_MODELS)


def build_model(name: str, norm, in_channels: int, num_classes: int, image_size, **kwargs):
    """A freshly initialised model ``name`` with its normalization layers from ``norm``."""
    try:
        builder = _MODELS[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; valid: {', '.join(model_names())}") from None
    return builder(norm, in_channels, num_classes, tuple(image_size), **kwargs)
