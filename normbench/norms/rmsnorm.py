"""``rms``: RMSNorm (Zhang & Sennrich 2019) for channels-first input.

Each sample is divided by its root mean square over all of (C, *spatial), with no mean
subtracted, then scaled per channel: ``x / sqrt(mean(x²) + eps) * weight``. Like layer
norm it uses no batch statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normbench.norms.registry import register_norm

__all__ = ["RMSNorm"]


@register_norm("rms")
class RMSNorm(nn.Module):
    """RMS normalization per sample over ``(C, *spatial)``, a per-channel ``weight``."""

    prefers_channels_last = True  # memory_format=auto: channels_last on the CPU (faster)

    centers = False  # no mean subtracted: a bias before it is kept

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.num_channels, self.eps = num_channels, eps
        self.weight = nn.Parameter(torch.ones(num_channels))

    def forward(self, input: Tensor) -> Tensor:
        dims = tuple(range(1, input.dim()))
        # float16/bfloat16 (autocast) computed in float32, returned in the input's dtype
        x = input.to(torch.promote_types(input.dtype, torch.float32))
        x = x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + self.eps)
        return (x * self.weight.reshape(1, -1, *([1] * (input.dim() - 2)))).to(input.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"
