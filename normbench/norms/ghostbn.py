"""``ghost_bn``: Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017).

Large batches make BatchNorm's statistics nearly noise-free, which removes part
of its regularising effect. Ghost BatchNorm keeps the large batch for the
gradient step but normalises each "virtual" batch of ``virtual_batch_size``
samples with its own statistics, so the normalization noise is that of the small
batch.

Running statistics: each virtual batch updates them in turn, exactly as if
BatchNorm had been called on the virtual batches one after another (Algorithm 1
of the paper). So ``num_batches_tracked`` counts virtual batches, and a step of
``k`` virtual batches moves the running statistics by ``1 - (1 - momentum)^k``
in total, not by ``momentum``. Eval mode (and anything without running
statistics in eval) is plain BatchNorm.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from normbench.norms.batchnorm import BatchNorm
from normbench.norms.registry import register_norm

__all__ = ["GhostBatchNorm"]


@register_norm("ghost_bn")
class GhostBatchNorm(BatchNorm):
    """BatchNorm over virtual batches of ``virtual_batch_size`` samples in training.

    Same parameters, buffers and state_dict keys as :class:`BatchNorm`; the batch
    is cut into consecutive virtual batches, the last one possibly smaller (a
    last virtual batch with a single value per channel is merged into the one
    before, since BatchNorm cannot normalise it).
    """

    @staticmethod
    def norm_batch_size(per_process: int, world: int, kwargs: dict) -> int:
        """A virtual batch (the process's batch where that is no larger)."""
        return min(per_process, kwargs.get("virtual_batch_size", 32))

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        backend: str = "auto",
        **kwargs,
    ):
        if virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be at least 1, got {virtual_batch_size}")
        super().__init__(num_features, eps, momentum, backend=backend, **kwargs)
        self.virtual_batch_size = virtual_batch_size

    def _split_sizes(self, input: Tensor) -> list[int]:
        n, vb = input.size(0), self.virtual_batch_size
        sizes = [vb] * (n // vb)
        if n % vb:
            sizes.append(n % vb)
        if len(sizes) > 1 and sizes[-1] * math.prod(input.shape[2:]) == 1:
            last = sizes.pop()
            sizes[-1] += last
        return sizes

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or input.size(0) <= self.virtual_batch_size:
            return super().forward(input)
        self._check_input_dim(input)
        normalise = super().forward
        return torch.cat([normalise(chunk) for chunk in input.split(self._split_sizes(input))])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"
