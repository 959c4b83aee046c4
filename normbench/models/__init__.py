"""The model registry: every model is built from a config and a norm registry entry.

Models never name a normalization variant: they receive a
:class:`~normbench.norms.registry.NormSpec` and call it with a channel count. A built
model is then put in the memory layout its run asks for (``memory_format``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

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


def choose_memory_format(setting: str, device: str, model, norm) -> str:
    """The layout ``memory_format=setting`` gives a run: ``contiguous`` or ``channels_last``.

    ``auto`` is channels_last on the CPU for a model with 2-d convolutions and a variant
    that declares it runs faster so (``prefers_channels_last``): there torch's
    convolutions and pooling are faster on channels_last and a training step of
    small_cnn or resnet20 ran faster (docs/configuration.md#memory-layout); else
    contiguous, the layout a variant may assume (its ``view``s), and on CUDA, where it
    has not been measured.
    """
    if setting != "auto":
        return setting
    convolves = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    faster = device == "cpu" and convolves and norm.prefers_channels_last
    return "channels_last" if faster else "contiguous"


def torch_memory_format(layout: str) -> torch.memory_format:
    """torch's memory format for a layout's name (``config.LAYOUTS``)."""
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    if layout not in formats:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(formats)}")
    return formats[layout]


def set_memory_format(model, layout: str) -> None:
    """Put ``model``'s 4-d weights, and the 4-d inputs it is given, in ``layout``
    (``contiguous`` or ``channels_last``); the activations in between follow, as torch's
    convolutions and pooling keep their input's layout. The inputs are converted by a
    forward pre-hook, so every caller (training, evaluation, the batch-statistics
    measures) feeds the model alike; the state_dict is the same in either layout."""
    fmt = torch_memory_format(layout)
    model.to(memory_format=fmt)
    model.register_forward_pre_hook(functools.partial(_inputs_in, fmt))


def _inputs_in(fmt, module, args):
    x, *rest = args
    if not (hasattr(x, "dim") and x.dim() == 4):
        return None
    x = x.contiguous(memory_format=fmt)  # a copy only where the layout differs
    # Strides written out in full: a size-1 dimension's stride is free (a one-channel
    # batch is contiguous and channels_last at once), and torch's convolutions choose
    # their layout by the strides themselves; numpy's (HW, 1, W, 1) reads as channels_last.
    n, c, h, w = x.shape
    strides = (h * w * c, 1, w * c, c) if fmt == torch.channels_last else (c * h * w, h * w, w, 1)
    if x.stride() != strides:
        x = x.as_strided(x.shape, strides, x.storage_offset())
    return (x, *rest)


# Registration happens on import; these modules only define and register models.
from normbench.models import mlp, resnet, small_cnn  # noqa: E402, F401
