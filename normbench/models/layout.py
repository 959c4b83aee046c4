"""A model's memory layout: which one a run gets (``memory_format``), and putting a built
model and its inputs in it."""

from __future__ import annotations

import functools

import torch


def choose_memory_format(setting: str, device: str, model, norm) -> str:
    """The layout ``memory_format=setting`` gives a run: ``contiguous`` or ``channels_last``.

    ``auto`` is channels_last on the CPU for a model with 2-d convolutions and a variant
    that declares it runs faster so (``prefers_channels_last``): there torch's
    convolutions and pooling are faster on channels_last and a training step of
    small_cnn or resnet20 ran faster (benchmarks/README.md); else
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
