"""Autograd glue and the functional ``batch_norm``, on top of the kernel.

:class:`BatchNormFunction` is the only place that ties the kernel's forward and
backward into autograd, and :func:`batch_norm` the only place that knows torch's
``F.batch_norm`` semantics (argument checks, running-statistics update, eval
mode). A faster kernel replaces the two calls into :mod:`reference` and nothing
else.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from normbench.kernels import reference

__all__ = ["BatchNormFunction", "batch_norm", "batch_norm_train"]


class BatchNormFunction(torch.autograd.Function):
    """Training-mode BatchNorm: ``(input, weight, bias, eps) -> (y, mean, invstd)``.

    ``mean`` and ``invstd`` are the batch statistics (non-differentiable outputs,
    as in torch's ``native_batch_norm``), returned so callers can update running
    statistics without a second pass over the data. Double backward is not
    supported: the hand-derived backward is a leaf computation.
    """

    @staticmethod
    def forward(input, weight, bias, eps):
        return reference.forward_train(input, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, _ = inputs
        _, mean, invstd = output
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, invstd)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dinvstd):
        input, weight, mean, invstd = ctx.saved_tensors
        mask = tuple(ctx.needs_input_grad[:3])
        dx, dweight, dbias = reference.backward(dy, input, weight, mean, invstd, mask)
        if dweight is not None:
            dweight = dweight.to(weight.dtype)
        if dbias is not None:
            dbias = dbias.to(ctx.bias_dtype)
        return dx, dweight, dbias, None


def _verify_batch_size(size: torch.Size) -> None:
    # torch's own check and wording, so normbench's layers fail exactly like torch's
    values = size[0]
    for extent in size[2:]:
        values *= extent
    if values == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}"
        )


def batch_norm_train(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalise with the batch's statistics: ``(y, mean, invstd)``, differentiable in ``y``.

    For variants that need the statistics themselves (batch renormalization).
    Raises torch's ValueErrors for one value per channel and non-positive eps.
    """
    _verify_batch_size(input.size())
    if eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    return BatchNormFunction.apply(input, weight, bias, eps)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``torch.nn.functional.batch_norm``, computed by normbench's kernel.

    Training: normalise with the batch's statistics and, where given, update
    ``running_mean`` and ``running_var`` in place as
    ``running = (1 - momentum) * running + momentum * batch``, the variance
    unbiased (``n / (n - 1)``) as torch does. Eval: normalise with the running
    statistics.
    """
    if not training:
        if eps < 0.0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
        if running_mean is None or running_var is None:
            raise RuntimeError("running_mean must be defined in evaluation mode")
        return reference.forward_eval(input, running_mean, running_var, weight, bias, eps)

    y, mean, invstd = batch_norm_train(input, weight, bias, eps)
    with torch.no_grad():
        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        if running_var is not None:
            # the kernel hands back invstd, not the variance: undo the rsqrt
            n = input.numel() // input.size(1)
            var = (invstd.pow(-2) - eps) * (n / (n - 1))
            running_var.lerp_(var.to(running_var.dtype), momentum)
    return y
