"""``layer``, ``instance`` and ``group``: per-sample normalizations, all GroupNorm.

Wu & He (2018) showed layer norm (one group) and instance norm (one group per
channel) are the two ends of GroupNorm, so the three are ``torch.nn.GroupNorm``
with a different group count: same per-channel affine ``weight``/``bias``, no
running statistics, identical in training and eval, independent of batch size.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from normbench.norms.registry import register_norm

__all__ = ["GroupNorm", "InstanceNorm", "LayerNorm", "group_count"]


def group_count(num_channels: int, groups: int) -> int:
    """The largest divisor of ``num_channels`` that is at most ``groups``.

    GroupNorm needs the groups to divide the channels, and a network's widths
    rarely all divide by one number (a 12-channel layer with ``groups=8`` gets 6).
    """
    if groups < 1:
        raise ValueError(f"groups must be at least 1, got {groups}")
    return max(g for g in range(1, min(groups, num_channels) + 1) if num_channels % g == 0)


@register_norm("layer")
class LayerNorm(nn.GroupNorm):
    """Layer norm for ``(N, C, *)``: each sample over all of (C, H, W), per-channel affine.

    Unlike ``torch.nn.LayerNorm`` (whose affine covers the whole normalised
    shape), the scale and shift are per channel, so the layer works at any
    spatial size and swaps freely with BatchNorm.
    """

    prefers_channels_last = True  # memory_format=auto: channels_last on the CPU (faster)

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True, **factory):
        super().__init__(1, num_channels, eps=eps, affine=affine, **factory)


@register_norm("instance")
class InstanceNorm(nn.GroupNorm):
    """Instance norm: each sample and channel over its spatial positions, per-channel affine.

    ``torch.nn.InstanceNorm2d(affine=True)`` without running statistics. It needs
    spatial dimensions: on ``(N, C)`` input every value would be its own group.
    """

    needs_spatial = True
    # torch's group norm with one channel a group is slower on channels_last (a step measured:
    # benchmarks/README.md)
    prefers_channels_last = False

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True, **factory):
        super().__init__(num_channels, num_channels, eps=eps, affine=affine, **factory)

    def forward(self, input: Tensor) -> Tensor:
        # with a single value per (sample, channel) the output would be the bias alone
        if input.dim() < 3 or math.prod(input.shape[2:]) == 1:
            raise ValueError(
                "instance norm needs spatial dimensions with more than one position: "
                f"expected (N, C, *spatial) input, got shape {tuple(input.shape)}"
            )
        return super().forward(input)


@register_norm("group")
class GroupNorm(nn.GroupNorm):
    """Group norm (Wu & He 2018) with ``groups`` groups, or the most that divide C below that.

    The group count actually used is ``num_groups`` (see :func:`group_count`).
    """

    prefers_channels_last = True  # memory_format=auto: channels_last on the CPU (faster)

    def __init__(
        self,
        num_channels: int,
        groups: int = 8,
        eps: float = 1e-5,
        affine: bool = True,
        **factory,
    ):
        super().__init__(
            group_count(num_channels, groups), num_channels, eps=eps, affine=affine, **factory
        )
        self.groups = groups
