"""``none``: no normalization, the control every variant is compared against."""

from __future__ import annotations

from torch import nn

from normbench.norms.registry import register_norm

__all__ = ["NoNorm"]


@register_norm("none")
class NoNorm(nn.Identity):
    """The identity, taking (and ignoring) a norm layer's ``(num_channels, **kwargs)``.

    ``centers = False`` tells models that a layer before it keeps its bias.
    """

    prefers_channels_last = True  # memory_format=auto: channels_last on the CPU (faster)

    centers = False

    def __init__(self, num_channels: int, **kwargs):
        super().__init__()
        self.num_channels = num_channels
