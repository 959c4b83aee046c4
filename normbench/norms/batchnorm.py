"""``custom_bn`` (normbench's BatchNorm, on its kernel) and ``torch_bn`` (torch's, the baseline).

Both subclass torch's ``_BatchNorm``, so the constructor arguments, parameters,
buffers, state_dict keys (``num_batches_tracked`` included), ``reset_parameters``
and checkpoint loading are torch's: a checkpoint moves between
``torch.nn.BatchNorm2d`` and :class:`BatchNorm2d` in both directions. The
registered classes accept any ``(N, C, *)`` input; :class:`BatchNorm1d`,
:class:`BatchNorm2d` and :class:`BatchNorm3d` check the number of dimensions
like their torch namesakes, as drop-in replacements.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from normbench.kernels import (
    BACKENDS,
    batch_norm,
    batch_norm_relu_pool,
    batch_norm_tracked,
    relu_pool_applies,
)
from normbench.norms.registry import register_norm

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "TorchBatchNorm"]


def _check_at_least_2d(input: Tensor) -> None:
    if input.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


@register_norm("custom_bn")
class BatchNorm(_BatchNorm):
    """BatchNorm over ``(N, C, *)`` input, computed by normbench's kernel.

    Same arguments and semantics as ``torch.nn.BatchNorm2d``: ``momentum=None``
    gives a cumulative moving average, ``track_running_stats=False`` normalises
    with batch statistics in eval mode too, the running variance is unbiased.
    One more keyword, ``backend``, picks the kernel: ``auto`` (by device), ``cpu``
    (the compiled C++ kernel), ``triton`` or ``reference``. And ``relu=True`` makes it
    the norm and the ReLU after it in one layer (as timm's ``BatchNormAct2d``): the kernel
    writes the activated output and masks the gradient inside its own backward, one pass
    less each way than a ReLU module after it, with the same results. ``pool=True`` (with
    ``relu=True``) adds the 2x2 max-pooling of stride 2 that follows in small_cnn
    (``F.max_pool2d(y, 2)``): on the CPU kernel with channels_last input (float32,
    float64, bfloat16 or float16), the layer writes the pooled output in the normalizing
    pass and its backward takes the pooled gradient without the full-size one
    (docs/kernel.md); elsewhere it composes the two, with the same results.
    """

    prefers_channels_last = True  # memory_format=auto: channels_last on the CPU (faster)

    #: Models ask for the fused layer where they apply norm then ReLU (NormSpec).
    fuses_relu = True
    #: ... and norm, ReLU, then 2x2 max-pooling. A subclass fuses the pooling only where it
    #: declares this itself (NormSpec.fuses_pool): its own forward may not apply it.
    fuses_pool = True

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        backend: str = "auto",
        relu: bool = False,
        pool: bool = False,
        *,
        bias: bool = True,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown norm backend {backend!r}; valid: {', '.join(BACKENDS)}")
        if pool and not relu:
            raise ValueError("pool=True fuses the ReLU and the pooling after it: needs relu=True")
        # the class whose forward runs must say it pools (a subclass's own forward may not)
        runs = next(c for c in type(self).__mro__ if "forward" in vars(c))
        if pool and not vars(runs).get("fuses_pool", False):
            raise ValueError(f"{type(self).__name__} does not fuse pooling (pool=True)")
        # torch's newer keyword (a weight without a bias); passed only where asked for, so
        # that a torch without it keeps working, and refuses it as its own class does
        no_bias = {} if bias else {"bias": False}
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **no_bias
        )
        self.backend = backend
        self.relu = relu
        self.pool = pool

    def _check_input_dim(self, input: Tensor) -> None:
        _check_at_least_2d(input)

    def forward(self, input: Tensor) -> Tensor:
        if not self.pool:
            return self._normalize(input)
        self._check_pool_input(input)
        if relu_pool_applies(input, self.backend):
            # the buffers as _normalize passes them: in training only where it tracks them
            buffers = not self.training or self.track_running_stats
            return batch_norm_relu_pool(
                input,
                self.running_mean if buffers else None,
                self.running_var if buffers else None,
                self.num_batches_tracked if self.training and self.track_running_stats else None,
                self.weight,
                self.bias,
                self.training,
                self.momentum,
                self.eps,
            )
        return F.max_pool2d(self._normalize(input), 2)

    def _check_pool_input(self, input: Tensor) -> None:
        self._check_input_dim(input)
        if input.dim() != 4:  # (max_pool2d would take 3-d input as one unbatched image)
            raise ValueError(f"pool=True takes (N, C, H, W) input (got {input.dim()}D input)")

    def _normalize(self, input: Tensor) -> Tensor:
        # torch's _BatchNorm.forward, on normbench's functions
        self._check_input_dim(input)
        if self.training and self.track_running_stats:
            # training with running statistics: the call of nearly every step
            return batch_norm_tracked(
                input,
                self.running_mean,
                self.running_var,
                self.num_batches_tracked,
                self.weight,
                self.bias,
                self.momentum,
                self.eps,
                self.backend,
                self.relu,
            )
        # Eval, or no tracking: batch statistics in training, and in eval when there are
        # no running ones; the buffers are passed only where they are read (eval).
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training
        return batch_norm(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            bn_training,
            0.0 if self.momentum is None else self.momentum,
            self.eps,
            self.backend,
            self.relu,
        )

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + (", relu=True" if self.relu else "")
            + (", pool=True" if self.pool else "")
        )


class BatchNorm1d(BatchNorm):
    """Drop-in for ``torch.nn.BatchNorm1d``: ``(N, C)`` or ``(N, C, L)`` input."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchNorm2d(BatchNorm):
    """Drop-in for ``torch.nn.BatchNorm2d``: ``(N, C, H, W)`` input."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchNorm3d(BatchNorm):
    """Drop-in for ``torch.nn.BatchNorm3d``: ``(N, C, D, H, W)`` input."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


@register_norm("torch_bn")
class TorchBatchNorm(_BatchNorm):
    """torch's own BatchNorm, unchanged, over any ``(N, C, *)`` input: the baseline.

    For 4-d input it is ``torch.nn.BatchNorm2d`` exactly (same forward, cuDNN
    included); only the input-dimension check is relaxed.
    """

    prefers_channels_last = True  # memory_format=auto: channels_last on the CPU (faster)

    def _check_input_dim(self, input: Tensor) -> None:
        _check_at_least_2d(input)
