"""``frn``: Filter Response Normalization with its Thresholded Linear Unit (Singh &
Krishnan 2020, "Filter Response Normalization Layer").

Per sample and channel, over the spatial positions: ``x / sqrt(mean(x²) + eps)``, a
per-channel affine, then ``max(y, tau)`` with a learnable per-channel ``tau``. No mean
is subtracted and no batch statistic is used: the layer behaves the same in training
and eval at any batch size. It carries its activation (the TLU), so models put no ReLU
after it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from normbench.norms.registry import register_norm

__all__ = ["FilterResponseNorm"]


def _per_channel(t: Tensor, dims: int) -> Tensor:
    return t.reshape(1, -1, *([1] * (dims - 2)))


@register_norm("frn")
class FilterResponseNorm(nn.Module):
    """FRN + TLU over ``(N, C, *spatial)`` input; parameters ``weight`` (gamma), ``bias``
    (beta) and ``tau``, one per channel."""

    centers = False  # nothing subtracted: a bias before it is not redundant
    needs_spatial = True  # over one position, x / |x| is only a sign
    carries_activation = True
    prefers_channels_last = False  # hardly faster a step on channels_last (benchmarks/README.md)

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.num_channels, self.eps = num_channels, eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.tau = nn.Parameter(torch.zeros(num_channels))

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 3 or math.prod(input.shape[2:]) == 1:
            raise ValueError(
                "frn needs spatial dimensions with more than one position: expected "
                f"(N, C, *spatial) input, got shape {tuple(input.shape)}"
            )
        dims = input.dim()
        # float16/bfloat16 (autocast) computed in float32, returned in the input's dtype
        x = input.to(torch.promote_types(input.dtype, torch.float32))
        nu2 = x.pow(2).mean(dim=tuple(range(2, dims)), keepdim=True)
        x = x * torch.rsqrt(nu2 + self.eps)
        y = _per_channel(self.weight, dims) * x + _per_channel(self.bias, dims)
        return torch.maximum(y, _per_channel(self.tau, dims)).to(input.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"
