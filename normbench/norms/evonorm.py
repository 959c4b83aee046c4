"""``evonorm_s0``: EvoNorm-S0 (Liu, Brock, Simonyan & Le 2020, "Evolving Normalization-
Activation Layers").

``x * sigmoid(v * x) / group_std(x) * gamma + beta``: a SiLU-like gate with a learnable
per-channel ``v``, divided by each sample's standard deviation over its group of
channels and their positions (groups as in ``group``: the largest divisor of C that
is at most ``groups``). No batch statistics; the layer carries its activation, so
models put no ReLU after it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normbench.norms.groupnorm import group_count
from normbench.norms.registry import register_norm

__all__ = ["EvoNormS0"]


@register_norm("evonorm_s0")
class EvoNormS0(nn.Module):
    """EvoNorm-S0 over ``(N, C, *)`` input; parameters ``weight`` (gamma), ``bias`` (beta)
    and ``v``, one per channel."""

    centers = False  # the numerator is x itself: a bias before it is not redundant
    carries_activation = True
    prefers_channels_last = False  # no faster a step on channels_last (benchmarks/README.md)

    def __init__(self, num_channels: int, groups: int = 8, eps: float = 1e-5):
        super().__init__()
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.num_channels, self.groups, self.eps = num_channels, groups, eps
        self.num_groups = group_count(num_channels, groups)
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.v = nn.Parameter(torch.ones(num_channels))

    def forward(self, input: Tensor) -> Tensor:
        n, c = input.shape[:2]
        shape = (1, -1, *([1] * (input.dim() - 2)))
        dtype = input.dtype  # float16/bfloat16 (autocast) computed in float32, returned as it
        input = input.to(torch.promote_types(dtype, torch.float32))
        grouped = input.reshape(n, self.num_groups, -1)
        # the biased variance, as the paper's moments
        var = grouped.var(dim=2, unbiased=False, keepdim=True)
        std = torch.sqrt(var + self.eps).expand_as(grouped).reshape(input.shape)
        gate = input * torch.sigmoid(self.v.reshape(shape) * input)
        return (gate / std * self.weight.reshape(shape) + self.bias.reshape(shape)).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, groups={self.groups} ({self.num_groups}), eps={self.eps}"
