"""The functional ``batch_norm``: ``torch.nn.functional.batch_norm``'s semantics on normbench's ops.

This is the one place that knows torch's ``F.batch_norm`` contract (argument
checks, the running-statistics update, eval mode); the normalization layers call
:func:`batch_norm`, or :func:`batch_norm_train` where they need the batch
statistics themselves, and never a kernel directly.

The tensors themselves (sizes, devices, dtypes) are checked by the operators, before a
kernel reads them (:mod:`normbench.kernels.checks` has the same rules in Python): what is
checked here is what torch's ``F.batch_norm`` checks before its operator (the batch size,
eps, the running statistics given together), and the one rule that spans two operators
(the running statistics' dtype against the weight's, :func:`_check_dtypes`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from normbench.kernels import checks, ops, reference

__all__ = [
    "batch_norm",
    "batch_norm_relu_pool",
    "batch_norm_stats",
    "batch_norm_synced",
    "batch_norm_tracked",
    "batch_norm_train",
    "supported_layout",
]


def _verify_batch_size(size: torch.Size) -> None:
    # torch's own check and wording, so normbench's layers fail exactly like torch's
    values = size[0]
    for extent in size[2:]:
        values *= extent
    if values == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}"
        )


def _check_channels(size: torch.Size) -> None:
    # torch fails on zero channels too (an IndexError from deep inside); the kernels would
    # divide by the channel count
    if len(size) >= 2 and size[1] == 0:
        raise ValueError(f"BatchNorm needs at least one channel, got input size {size}")


def _empty_batch(input: Tensor, weight: Tensor | None, bias: Tensor | None):
    """An empty batch (N = 0, or no spatial positions) as torch treats it, with none of its
    checks: ``input * weight[0] + bias[0]`` (an empty output, of the dtype that gives, zero
    gradients for weight and bias), no statistics (NaN), the running ones left as they are."""
    y = input.clone()
    if weight is not None:
        y = y * weight[0]
    if bias is not None:
        y = y + bias[0]
    channels = input.shape[1] if input.dim() > 1 else 0
    acc = reference.accumulation_dtype(input.dtype) if input.is_floating_point() else torch.float32
    none = torch.full((channels,), float("nan"), dtype=acc, device=input.device)
    return y, none, none.clone()


def _check_dtypes(x: Tensor, weight, bias, running_mean: Tensor, running_var: Tensor) -> None:
    """torch's dtype rule over the four parameters, in a few comparisons where all are the
    input's dtype (else every check, in torch's order: :func:`checks.arguments`). The
    training forward checks the weight's and bias's, the update the running statistics', but
    neither sees the other's."""
    dtype = x.dtype
    if (
        running_mean.dtype is dtype
        and running_var.dtype is dtype
        and (weight is None or weight.dtype is dtype)
        and (bias is None or bias.dtype is dtype)
    ):
        return
    checks.arguments(x, weight, bias, running_mean, running_var, written=True)


def _one_running_statistic(input, weight, bias, running_mean, running_var) -> None:
    """torch's refusal of one running statistic without the other, after its checks of the
    sizes and devices."""
    checks.placed(input, weight, bias, running_mean, running_var)
    raise ValueError("running_mean and running_var must either both be None or neither be None")


def supported_layout(x: Tensor) -> Tensor:
    """``x`` if the kernels read it as it is (contiguous, channels_last), else a contiguous copy.

    Made once, before the operator, so autograd saves the copy for the backward too.
    """
    if x.is_contiguous() or reference.memory_format(x) is not torch.contiguous_format:
        return x
    return x.contiguous()


def _check_training(input: Tensor, eps: float, weight, bias, running_mean, running_var) -> None:
    """torch's checks of a training forward's input and eps, with its wording; for an input
    of fewer than 2 dimensions, then its checks of the parameters' sizes (against no
    channels) before it refuses the input (the forward operator sees no running statistics)."""
    size = input.size()
    _check_channels(size)
    _verify_batch_size(size)
    if eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if len(size) < 2 and input.numel() > 0:  # (torch checks nothing on an empty batch)
        checks.placed(input, weight, bias, running_mean, running_var)


def _train(
    input,
    weight,
    bias,
    running_mean,
    running_var,
    momentum,
    eps,
    backend,
    relu=False,
    num_batches_tracked=None,
    cumulative=False,
):
    """The checked training forward; ``num_batches_tracked`` (given with the running
    statistics) is incremented with their update, in its call (one operator call less per
    layer and step), and here where there is none: an empty batch, or arguments that are
    refused (torch counts a step before it checks them)."""
    counted = False
    try:
        _check_training(input, eps, weight, bias, running_mean, running_var)
        if input.numel() == 0:  # no statistics: the running ones stay, the batch is counted
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
                counted = True
            y, mean, invstd = _empty_batch(input, weight, bias)
            return (torch.relu(y) if relu else y), mean, invstd
        if (running_mean is None) != (running_var is None):
            _one_running_statistic(input, weight, bias, running_mean, running_var)
        x = supported_layout(input)
        backend = ops.resolve_backend(backend, x)
        if running_mean is not None and running_var is not None:
            _check_dtypes(x, weight, bias, running_mean, running_var)
        # The update checks all its arguments before it counts the batch: an error from
        # either operator comes before the count.
        return ops.train(
            x,
            weight,
            bias,
            running_mean,
            running_var,
            momentum,
            eps,
            backend,
            relu,
            num_batches_tracked,
            cumulative,
        )
    except Exception:
        if num_batches_tracked is not None and not counted:
            num_batches_tracked.add_(1)
        raise


def batch_norm_tracked(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    backend: str = "auto",
    relu: bool = False,
) -> Tensor:
    """``torch.nn.BatchNorm*d``'s training forward with tracked running statistics.

    Adds one to ``num_batches_tracked`` (when given) and, with ``momentum=None``,
    updates the running statistics by the cumulative average ``1 / num_batches_tracked``;
    otherwise as :func:`batch_norm` with ``training=True`` (and ``relu``).
    """
    tracked = running_mean is not None and running_var is not None
    counter = num_batches_tracked if tracked else None  # counted with the update (_train)
    if momentum is None and counter is not None and counter.numel() != 1:
        # torch's module counts, then reads the counter as a number: its ValueError
        ops.count_batch(counter, 0.0, True)
    factor = 0.0 if momentum is None else momentum
    if num_batches_tracked is not None and not tracked:  # no update: counted here, first
        factor = ops.count_batch(num_batches_tracked, factor, momentum is None)
    y, _, _ = _train(
        input, weight, bias, running_mean, running_var, factor, eps, backend, relu,
        counter, counter is not None and momentum is None,
    )  # fmt: skip
    return y


def batch_norm_train(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    backend: str = "auto",
    relu: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalise with the batch's statistics: ``(y, mean, invstd)``, differentiable in ``y``
    (through a fused ReLU with ``relu``).

    For variants that need the statistics themselves (batch renormalization).
    Raises torch's ValueErrors for one value per channel and non-positive eps.
    """
    return _train(input, weight, bias, None, None, 0.0, eps, backend, relu)


def batch_norm_stats(input: Tensor, eps: float, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """The batch's ``(mean, invstd)`` per channel, without gradient, exactly as
    :func:`batch_norm_train` computes them; for variants that need them before they
    normalise (batch renormalization's corrections). Checked as a training forward is."""
    _check_training(input, eps, None, None, None, None)
    if input.numel() == 0:  # no statistics, as the training forward's (torch checks nothing)
        return _empty_batch(input, None, None)[1:]
    x = supported_layout(input)
    return ops.statistics(x, eps, ops.resolve_backend(backend, x))


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    backend: str = "auto",
    relu: bool = False,
) -> Tensor:
    """``torch.nn.functional.batch_norm``, computed by normbench's kernel (followed by a
    ReLU fused into it with ``relu``: ``torch.relu(F.batch_norm(...))``).

    Training: normalise with the batch's statistics and, where given, update
    ``running_mean`` and ``running_var`` in place as
    ``running = (1 - momentum) * running + momentum * batch``, the variance
    unbiased (``n / (n - 1)``) as torch does. Eval: normalise with the running
    statistics. ``backend``: ``auto``, ``cpu``, ``triton`` or ``reference``.
    """
    _check_channels(input.size())
    if not training:
        if eps < 0.0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
        if input.numel() == 0:  # torch's empty batch, before any check of its own
            y, _, _ = _empty_batch(input, weight, bias)
            return torch.relu(y) if relu else y
        if running_mean is None or running_var is None:
            # torch's refusal, after its size checks
            checks.sizes(input, weight, bias, running_mean, running_var)
            missing = "running_mean" if running_mean is None else "running_var"
            raise RuntimeError(f"{missing} must be defined in evaluation mode")
        x = supported_layout(input)
        return ops.forward_eval(
            x, running_mean, running_var, weight, bias, eps, ops.resolve_backend(backend, x), relu
        )

    y, _, _ = _train(input, weight, bias, running_mean, running_var, momentum, eps, backend, relu)
    return y


# ------------------------------------------------------------------------------ pooled


class _ReluPool(torch.autograd.Function):
    """The norm with its ``(mean, invstd)`` given, its ReLU and a 2x2 max-pooling, as one
    pair of CPU operators. With ``batch_stats`` the statistics are the batch's, and their
    gradient is part of the backward's; else (running statistics) they are constants."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, batch_stats):
        out, choice = ops.relu_pool_forward(x, weight, bias, mean, invstd)
        ctx.save_for_backward(x, choice, weight, bias, mean, invstd)
        ctx.batch_stats = batch_stats
        ctx.mark_non_differentiable(choice)
        # choice's gradient stays None: materialised, it would be a zero-filled tensor a
        # quarter of x's size in bytes, written on every backward and never read
        ctx.set_materialize_grads(False)
        return out, choice

    @staticmethod
    @torch.autograd.function.once_differentiable  # (a double backward raises, as the kernel's)
    def backward(ctx, grad_out, _):
        x, choice, weight, bias, mean, invstd = ctx.saved_tensors
        dx, dweight, dbias = ops.relu_pool_backward(
            grad_out, x, choice, weight, bias, mean, invstd, ctx.batch_stats
        )
        wanted = ctx.needs_input_grad
        # in the parameters' own shapes: torch takes a (1, C) weight too
        return (
            dx if wanted[0] else None,
            dweight.reshape(weight.shape) if wanted[1] else None,
            dbias.reshape(bias.shape) if wanted[2] else None,
            None,
            None,
            None,
        )


def batch_norm_relu_pool(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
) -> Tensor:
    """``F.max_pool2d(torch.relu(bn(input)), 2)`` in one pass each way, ``bn`` a
    ``torch.nn.BatchNorm2d``'s forward in the mode ``training`` says (the batch counter
    and the running statistics' update included, as :func:`batch_norm_tracked`); for an
    ``input`` :func:`normbench.kernels.ops.relu_pool_applies` accepts (elsewhere a layer
    composes the unfused operators). The gradient is the composition's: each
    window's first largest value takes it, where the ReLU passes it."""
    batch_stats = training or running_mean is None or running_var is None
    if not batch_stats:  # eval: the running statistics, checked as the eval operator does
        if eps < 0.0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
        checks.eval_(input, running_mean, running_var, weight, bias)
        mean = running_mean.detach()
        invstd = (running_var.detach().double() + eps).rsqrt().to(running_var.dtype)
        return _ReluPool.apply(input, weight, bias, mean, invstd, False)[0]
    # As _train: every argument checked before the running statistics are written; a
    # batch that fails is counted all the same (torch counts before it checks). The
    # update, last, counts it only once its own checks pass.
    try:
        _check_training(input, eps, weight, bias, running_mean, running_var)
        if (running_mean is None) != (running_var is None):
            _one_running_statistic(input, weight, bias, running_mean, running_var)
        checks.forward(input, weight, bias)
        mean, invstd = ops.statistics(input, eps, "cpu")
        if training and running_mean is not None:
            _check_dtypes(input, weight, bias, running_mean, running_var)
            count = input.numel() // input.shape[1]
            ops.update(
                running_mean, running_var, mean, invstd, 0.0 if momentum is None else momentum,
                eps, count, "cpu", num_batches_tracked,
                momentum is None and num_batches_tracked is not None,
            )  # fmt: skip
    except Exception:
        if training and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        raise
    return _ReluPool.apply(input, weight, bias, mean, invstd, True)[0]


# ------------------------------------------------------------------------------ synchronized


class _Synced(torch.autograd.Function):
    """The affine pass with a whole group's statistics (the kernel's eval operator), whose
    backward adds up the kernel's sums of the local part with ``all_reduce`` before the
    kernel's ``dx`` pass. ``dweight`` and ``dbias`` are the local part's (data parallelism
    adds up the parameters' gradients itself), as torch's SyncBatchNorm's."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, invstd, eps, total, backend, relu, all_reduce):
        # weight and bias in the statistics' dtype (a float16/bfloat16 layer's too: float32,
        # torch's mixed rule), for the operators; their gradients go back in their own
        acc = mean.dtype
        w = None if weight is None else weight.detach().to(acc)
        b = None if bias is None else bias.detach().to(acc)
        y = ops.forward_eval(x, mean, var, w, b, eps, backend, relu)
        ctx.save_for_backward(x, w, b, mean, invstd)
        ctx.total, ctx.backend, ctx.relu, ctx.all_reduce = total, backend, relu, all_reduce
        ctx.params = weight, bias
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, w, b, mean, invstd = ctx.saved_tensors
        if dy.dtype != x.dtype:
            dy = dy.to(x.dtype)
        dweight, dbias = ops.backward_reduce(dy, x, w, b, mean, invstd, ctx.backend, ctx.relu)
        # both sums in one float64 tensor (a copy: the local ones are the parameters'
        # gradients), added up over the group in place; every process takes part in the
        # reduction, whatever it needs (the collectives match). (A cat into a float64
        # buffer, and unbinding a (2, C) view, were slower than these.)
        channels = dweight.numel()
        sums = torch.cat((dweight, dbias)).to(torch.float64)
        ctx.all_reduce(sums)
        sum_dy_xhat, sum_dy = sums[:channels], sums[channels:]
        dx = None
        if ctx.needs_input_grad[0]:
            dx = ops.backward_apply(
                dy, x, w, b, mean, invstd, sum_dy, sum_dy_xhat, ctx.total, ctx.backend, ctx.relu
            )
        weight, bias = ctx.params
        grad_w = grad_b = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = dweight.to(weight.dtype).reshape(weight.shape)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_b = dbias.to(bias.dtype).reshape(bias.shape)
        return (dx, grad_w, grad_b) + (None,) * 8


def batch_norm_synced(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    all_reduce: Callable[[Tensor], object],
    part: int = 0,
    parts: int = 1,
    backend: str = "auto",
    relu: bool = False,
) -> Tensor:
    """:func:`batch_norm_tracked` over a batch spread across ``parts`` processes
    (synchronized BatchNorm's training forward; this one's place among them is ``part``),
    the kernels knowing nothing of processes: the caller's ``all_reduce(t)`` adds up a
    float64 tensor over the processes in place (:func:`normbench.distributed.reduce_sum`:
    one collective), called twice a step, the same on every process. The forward sums a
    ``(parts, 1 + 2C)`` table whose row ``part`` is this part's count, mean and M2
    (``batch_norm_stats_table``), which every process merges the same way
    (``batch_norm_merge_stats``); the backward sums its two per-channel sums. The running
    statistics (when given) move towards the whole batch's, the variance unbiased by its
    count. Where the kernel runs on CUDA, the group's count is read back to the host once
    a step (the operators take it as a number)."""
    _check_channels(input.size())
    if eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if input.dim() < 2:
        checks.placed(input, weight, bias, running_mean, running_var)
    if (running_mean is None) != (running_var is None):
        _one_running_statistic(input, weight, bias, running_mean, running_var)
    x = supported_layout(input)
    backend = ops.resolve_backend(backend, x)
    if running_mean is not None and running_var is not None:
        _check_dtypes(x, weight, bias, running_mean, running_var)
    else:
        checks.forward(x, weight, bias)
    # the local count, mean and M2 (an empty part: zeros, which add nothing), one call; the
    # group's merged statistics, one call
    table = ops.statistics_table(x, parts, part, backend)
    all_reduce(table)
    acc = reference.accumulation_dtype(x.dtype)
    mean, var, invstd, count = ops.merge_statistics(table, eps, acc, backend)
    total = int(count)
    if total == 0:  # every part empty (each took part in the reduction): as one process's
        if num_batches_tracked is not None:  # empty batch, the running statistics stay
            num_batches_tracked.add_(1)
        y, _, _ = _empty_batch(input, weight, bias)
        return torch.relu(y) if relu else y
    if total == 1:  # torch's check, on the whole group's count
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size "
            f"{input.size()} ({total} values per channel in the whole synchronized group)"
        )
    y = _Synced.apply(x, weight, bias, mean, var, invstd, eps, total, backend, relu, all_reduce)
    if running_mean is not None and running_var is not None:
        counter = num_batches_tracked
        factor = 0.0 if momentum is None else momentum
        ops.update(
            running_mean, running_var, mean, invstd, factor, eps, total, backend,
            counter, counter is not None and momentum is None,
        )  # fmt: skip
    elif num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return y
