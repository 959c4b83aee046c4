"""The readable specification of BatchNorm, in plain torch operations.

Every faster kernel (C++ on CPU, Triton on GPU) is tested against these three
functions, so they favour clarity and numerical robustness over speed:

- the variance is computed in two passes, the mean first and then the mean of
  squared deviations, because the one-pass ``E[x^2] - E[x]^2`` cancels away every
  significant digit when the mean is large against the spread (activations with
  mean 1e4 and std 1 are enough to break it in float32);
- float16 and bfloat16 input is computed in float32 and rounded once at the end.

Conventions shared with the kernels that replace these functions:

- ``x`` is ``(N, C, *)`` in any memory layout (channels_last included); the
  statistics are per channel, over every dimension but 1, with the biased
  (divide by n) variance;
- ``mean`` and ``invstd = 1 / sqrt(var + eps)`` are ``(C,)`` tensors in the
  accumulation dtype (float32 for half-precision input, else the input's dtype);
- ``weight`` and ``bias`` are ``(C,)`` or None (``affine=False``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "accumulation_dtype",
    "backward",
    "backward_apply",
    "backward_reduce",
    "forward_eval",
    "forward_train",
    "memory_format",
    "merge_statistics",
    "statistics_table",
    "update_running_stats",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def memory_format(x: Tensor) -> torch.memory_format:
    """``x``'s layout: channels_last (4-d), channels_last_3d (5-d), or else contiguous."""
    if not x.is_contiguous():
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


def _reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _per_channel(t: Tensor, ndim: int) -> Tensor:
    """A ``(C,)`` tensor shaped to broadcast against ``(N, C, *)``."""
    return t.reshape(1, -1, *([1] * (ndim - 2)))


def _affine(xhat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    if weight is not None:
        xhat = xhat * _per_channel(weight.to(xhat.dtype), xhat.dim())
    if bias is not None:
        xhat = xhat + _per_channel(bias.to(xhat.dtype), xhat.dim())
    return xhat


def forward_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalise with the batch's statistics: ``(y, mean, invstd)``.

    ``y = (x - mean) * invstd * weight + bias`` in ``x``'s dtype and layout.
    """
    acc = x.to(accumulation_dtype(x.dtype))
    dims = _reduce_dims(x)
    mean = acc.mean(dim=dims)
    centered = acc - _per_channel(mean, x.dim())
    var = centered.square().mean(dim=dims)
    invstd = torch.rsqrt(var + eps)
    y = _affine(centered * _per_channel(invstd, x.dim()), weight, bias)
    return y.to(x.dtype), mean, invstd


def forward_eval(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Normalise with given statistics: ``(x - mean) / sqrt(var + eps) * weight + bias``;
    where that scale is not finite (a zero variance with eps = 0), torch's
    ``x * scale + (bias - mean * scale)``, whose NaNs and infinities torch gives."""
    dtype = accumulation_dtype(x.dtype)
    invstd = torch.rsqrt(running_var.to(dtype) + eps)
    # A channel whose invstd is not finite takes torch's expression below (its scale is not
    # finite either); the plain one, which torch.where drops there, must not reach the
    # gradient: its 0 * inf made the weight's gradient NaN where torch's is +-inf
    kept = torch.where(invstd.isfinite(), invstd, torch.zeros_like(invstd))
    xhat = (x.to(dtype) - _per_channel(running_mean.to(dtype), x.dim())) * _per_channel(
        kept, x.dim()
    )
    y = _affine(xhat, weight, bias)
    scale = invstd if weight is None else invstd * weight.to(dtype).reshape(-1)
    if not bool(scale.isfinite().all()):
        shift = -running_mean.to(dtype) * scale
        if bias is not None:
            shift = shift + bias.to(dtype).reshape(-1)
        torchs = x.to(dtype) * _per_channel(scale, x.dim()) + _per_channel(shift, x.dim())
        y = torch.where(_per_channel(scale.isfinite(), x.dim()), y, torchs)
    return y.to(x.dtype)


def backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`forward_train`: ``(dx, dweight, dbias)``.

    ``mean`` and ``invstd`` are :func:`forward_train`'s. ``output_mask`` says
    which of the three to compute (the rest come back None), as in torch's
    ``native_batch_norm_backward``. With ``xhat = (x - mean) * invstd`` and
    ``g = dy * weight``, per channel::

        dx      = invstd * (g - mean(g) - xhat * mean(g * xhat))
        dweight = sum(dy * xhat)
        dbias   = sum(dy)

    ``dx`` has ``x``'s dtype and memory layout; ``dweight`` and ``dbias`` come
    back in the accumulation dtype, for the caller to cast to its parameters'
    dtypes (``dweight`` is computed without a ``weight`` too).
    """
    dtype = mean.dtype
    ndim = x.dim()
    dims = _reduce_dims(x)
    invstd_c = _per_channel(invstd, ndim)
    xhat = (x.to(dtype) - _per_channel(mean, ndim)) * invstd_c
    dy = dy.to(dtype).contiguous(memory_format=memory_format(x))

    dx = dweight = dbias = None
    if output_mask[0]:
        g = dy if weight is None else dy * _per_channel(weight.to(dtype), ndim)
        mean_g = _per_channel(g.mean(dim=dims), ndim)
        mean_gxhat = _per_channel((g * xhat).mean(dim=dims), ndim)
        dx = (invstd_c * (g - mean_g - xhat * mean_gxhat)).to(x.dtype)
    if output_mask[1]:
        dweight = (dy * xhat).sum(dim=dims)
    if output_mask[2]:
        dbias = dy.sum(dim=dims)
    return dx, dweight, dbias


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    invstd: Tensor,
    momentum: float,
    eps: float,
    count: int,
) -> None:
    """``running = (1 - momentum) * running + momentum * batch``, in place.

    The batch variance is recovered from ``invstd`` and made unbiased
    (``count / (count - 1)``, ``count`` values per channel), as torch does.
    """
    with torch.no_grad():
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        var = (invstd.double().pow(-2) - eps) * (count / max(count - 1, 1))
        running_var.lerp_(var.to(running_var.dtype), momentum)


def _masked_grad(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    relu: bool,
) -> tuple[Tensor, Tensor]:
    """``(g, xhat)`` in the statistics' dtype: ``dy``, masked where the fused ReLU's input
    ``xhat * weight + bias`` was not positive (a NaN input passes ``dy``, as torch's
    ``threshold_backward``), and the normalised input."""
    dtype, ndim = mean.dtype, x.dim()
    xhat = (x.to(dtype) - _per_channel(mean, ndim)) * _per_channel(invstd, ndim)
    g = dy.to(dtype)
    if relu:
        g = torch.where(_affine(xhat, weight, bias) <= 0, torch.zeros_like(g), g)
    return g, xhat


def backward_reduce(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    relu: bool = False,
) -> tuple[Tensor, Tensor]:
    """The backward's sums alone, ``(sum(g * xhat), sum(g))`` per channel (``dweight`` and
    ``dbias`` of :func:`backward`; ``g`` is ``dy`` masked by the fused ReLU with ``relu``):
    what synchronized BatchNorm adds up over its processes."""
    g, xhat = _masked_grad(dy, x, weight, bias, mean, invstd, relu)
    dims = _reduce_dims(x)
    return (g * xhat).sum(dim=dims), g.sum(dim=dims)


def backward_apply(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: int,
    relu: bool = False,
) -> Tensor:
    """``dx`` from the sums of a whole (synchronized) batch of ``count`` values per channel::

        dx = invstd * weight * (g - sum_dy / count - xhat * sum_dy_xhat / count)

    :func:`backward`'s ``dx`` when the sums are :func:`backward_reduce`'s of ``x`` alone."""
    g, xhat = _masked_grad(dy, x, weight, bias, mean, invstd, relu)
    dtype, ndim = mean.dtype, x.dim()
    scale = invstd if weight is None else invstd * weight.to(dtype).reshape(-1)
    dx = _per_channel(scale, ndim) * (
        g
        - _per_channel(sum_dy.to(dtype) / count, ndim)
        - xhat * _per_channel(sum_dy_xhat.to(dtype) / count, ndim)
    )
    return dx.to(x.dtype).contiguous(memory_format=memory_format(x))


def statistics_table(x: Tensor, parts: int, part: int) -> Tensor:
    """Synchronized BatchNorm's local row: a zeroed ``(parts, 1 + 2C)`` float64 table whose
    row ``part`` is ``x``'s count, mean and M2 (``count * var``, the biased variance) per
    channel, in float64 whatever ``x``'s dtype (a mean rounded to float32 would lose what
    the merge needs of it); all zeros for an empty ``x``. Summed over the processes it
    holds every process's row."""
    channels = x.shape[1]
    table = torch.zeros(parts, 1 + 2 * channels, dtype=torch.float64, device=x.device)
    count = x.numel() // channels
    if count:
        var, mean = torch.var_mean(x.to(torch.float64), dim=_reduce_dims(x), unbiased=False)
        row = table[part]
        row[0] = count
        row[1 : 1 + channels] = mean
        row[1 + channels :] = var * count
    return table


def merge_statistics(
    table: Tensor, eps: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The rows of a :func:`statistics_table` summed over processes, merged in float64 by
    the parallel-variance formula (Chan, Golub & LeVeque): ``(mean, var, invstd)`` in
    ``dtype`` and the total count (an int64 scalar); NaN statistics and count 0 where no
    row has values."""
    channels = (table.shape[1] - 1) // 2
    counts = table[:, :1]
    total = counts.sum()
    means, m2s = table[:, 1 : 1 + channels], table[:, 1 + channels :]
    # each part's M2 plus its mean's spread around the whole mean, the deviation taken
    # directly (not as a difference of squares)
    merged = (counts * means).sum(0) / total
    var = (m2s.sum(0) + (counts * (means - merged).square()).sum(0)) / total
    invstd = (var + eps).rsqrt()
    return merged.to(dtype), var.to(dtype), invstd.to(dtype), total.to(torch.long)
