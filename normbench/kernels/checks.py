"""The operators' argument checks in Python: the rules and messages of ``batchnorm_cpu.cpp``'s.

The C++ operators check every tensor before they read its pointer (see "argument checks" in
``batchnorm_cpu.cpp``). The implementations registered from Python check the same, with
these functions: the Triton kernels (CUDA, or CPU tensors under Triton's interpreter) before
they launch, and the fake implementations (meta tensors, ``torch.compile``), so that a
traced call fails where an eager one does and a meta tensor beside a CPU one is refused as
torch refuses it. :func:`arguments` is torch's whole ``F.batch_norm`` contract, for the paths
that reach no operator (the reference backend) and for the one check no single operator can
make (the running statistics' dtype against the weight's and the input's: the training
forward and the update are two operators).

The messages, the exception types (RuntimeError; NotImplementedError for an input dtype
nothing computes in; IndexError for an input of fewer than 2 dimensions; ValueError for zero
channels) and the order of the checks are torch's, so that a call with several faults fails
with torch's exception type: the parameters' sizes, the input's dimensions, the devices, the
input's dtype, the parameters' dtypes, the running statistics' dimensions.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "arguments",
    "backward",
    "backward_apply",
    "dtypes",
    "eval_",
    "forward",
    "merge_statistics",
    "placed",
    "sizes",
    "statistics_table",
    "update",
]

#: The dtypes the kernels compute in.
KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
REDUCED = (torch.float16, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    """The dtype as torch's C++ messages name it: Float, Double, Half, BFloat16, Long, ..."""
    try:
        return torch.empty(0, dtype=dtype).type().removeprefix("torch.").removesuffix("Tensor")
    except (RuntimeError, TypeError):  # a dtype with no legacy tensor type name
        return str(dtype).removeprefix("torch.")


def _channels(x: Tensor) -> int:
    # torch counts no channels in an input of fewer than 2 dimensions (which it then refuses)
    return x.shape[1] if x.dim() >= 2 else 0


def _size(t: Tensor | None, name: str, channels: int) -> None:
    if t is not None and t.numel() != channels:
        raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")


def _input_shape(x: Tensor) -> None:
    if x.dim() < 2:
        dims = max(1, x.dim())
        raise IndexError(
            f"Dimension out of range (expected to be in range of [{-dims}, {dims - 1}], but got 1)"
        )
    if x.shape[1] == 0:
        raise ValueError(f"BatchNorm needs at least one channel, got input size {x.size()}")


def _device(t: Tensor | None, device: torch.device) -> None:
    if t is not None and t.device != device:
        raise RuntimeError(f"Tensor on device {t.device} is not on the expected device {device}!")


def _input_dtype(x: Tensor) -> None:
    if x.dtype not in KERNEL_DTYPES:
        raise NotImplementedError(f"\"batch_norm\" not implemented for '{dtype_name(x.dtype)}'")


def dtypes(x: Tensor, *params: Tensor | None) -> None:
    """torch's rule for the parameters' dtypes (weight, bias, running_mean, running_var, the
    ones given, in that order): all of x's dtype; or, when the first is not, all float32
    with a float16 or bfloat16 x."""
    given = [p for p in params if p is not None]
    if not given:
        return
    if given[0].dtype == x.dtype:
        for p in given:
            if p.dtype != x.dtype:
                raise RuntimeError(
                    f"expected scalar type {dtype_name(x.dtype)} but found {dtype_name(p.dtype)}"
                )
        return
    if any(p.dtype != torch.float32 for p in given):
        raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")
    if x.dtype not in REDUCED:
        raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")


def _untracked(t: Tensor | None, name: str) -> None:
    if t is not None and torch.is_grad_enabled() and t.requires_grad:
        raise RuntimeError(
            f"The function 'batch_norm' is not differentiable with respect to argument "
            f"'{name}'. This input cannot have requires_grad True."
        )


def _running_layout(t: Tensor | None, name: str, written: bool) -> None:
    if t is None:
        return
    if t.dim() != 1:
        raise RuntimeError(f"expected {name} to have 1 dims but tensor has {t.dim()}")
    if written and t.numel() > 1 and t.stride(0) == 0:
        raise RuntimeError(
            "unsupported operation: more than one element of the written-to tensor refers to "
            "a single memory location. Please clone() the tensor before performing the "
            "operation."
        )


def _statistic(t: Tensor, name: str, channels: int, device: torch.device) -> None:
    _size(t, name, channels)
    _device(t, device)
    if t.dtype not in KERNEL_DTYPES:
        raise RuntimeError(f"{name} must be a floating-point tensor, got {dtype_name(t.dtype)}")


# ------------------------------------------------------------------------ the operators' own


def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> None:
    """``batch_norm_forward``'s and ``batch_norm_stats``'s arguments."""
    _size(weight, "weight", _channels(x))
    _size(bias, "bias", _channels(x))
    _input_shape(x)
    _device(weight, x.device)
    _device(bias, x.device)
    _input_dtype(x)
    dtypes(x, weight, bias)


#: The dtypes the pooled operators read (bfloat16 and float16 computed in float32).
POOLED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def pooled(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor):
    """``relu_pool_forward``'s and ``relu_pool_backward``'s common arguments: the forward's,
    and x a channels_last (N, C, H, W) tensor of :data:`POOLED_DTYPES`, of 2x2 planes or
    larger."""
    forward(x, weight, bias)
    if x.dim() != 4:
        raise RuntimeError(f"the pooled layer takes (N, C, H, W) input, got {x.dim()} dimensions")
    if x.dtype not in POOLED_DTYPES:
        raise RuntimeError(
            f"the pooled layer reads float32, float64, bfloat16 or float16, got {x.dtype}"
        )
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise RuntimeError(
            f"the pooled layer needs at least 2x2 planes, got {x.shape[2]}x{x.shape[3]}"
        )
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise RuntimeError("the pooled layer reads channels_last input only")
    _statistic(mean, "mean", x.shape[1], x.device)
    _statistic(invstd, "invstd", x.shape[1], x.device)


def pooled_backward(
    grad_out: Tensor,
    x: Tensor,
    choice: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
) -> None:
    """``relu_pool_backward``'s arguments: :func:`pooled`'s, ``grad_out`` of the pooled
    output's shape, ``choice`` the forward's uint8 (N, H/2, W/2, C) tensor."""
    pooled(x, weight, bias, mean, invstd)
    n, c, h, w = x.shape
    if tuple(grad_out.shape) != (n, c, h // 2, w // 2):
        raise RuntimeError(
            f"grad_out must be the pooled output's shape {[n, c, h // 2, w // 2]}, "
            f"got {list(grad_out.shape)}"
        )
    if choice.dtype != torch.uint8 or tuple(choice.shape) != (n, h // 2, w // 2, c):
        raise RuntimeError(
            "choice must be relu_pool_forward's contiguous uint8 (N, H/2, W/2, C) tensor, "
            f"got {choice.dtype} {list(choice.shape)}"
        )


def backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
) -> None:
    """``batch_norm_backward``'s arguments: ``grad_out`` of ``x``'s shape, dtype and device."""
    forward(x, weight, bias)
    _statistic(mean, "mean", x.shape[1], x.device)
    _statistic(invstd, "invstd", x.shape[1], x.device)
    if grad_out.shape != x.shape:
        raise RuntimeError(
            f"grad_out should have the input's shape {list(x.shape)}, got {list(grad_out.shape)}"
        )
    _device(grad_out, x.device)
    if grad_out.dtype != x.dtype:
        raise RuntimeError(
            f"expected scalar type {dtype_name(x.dtype)} but found {dtype_name(grad_out.dtype)}"
        )


def backward_apply(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: int,
) -> None:
    """``batch_norm_backward_apply``'s arguments: the backward's, the two sums of C values,
    a positive count."""
    forward(x, weight, bias)
    _statistic(mean, "mean", x.shape[1], x.device)
    _statistic(invstd, "invstd", x.shape[1], x.device)
    _statistic(sum_dy, "sum_dy", x.shape[1], x.device)
    _statistic(sum_dy_xhat, "sum_dy_xhat", x.shape[1], x.device)
    if count <= 0:
        raise RuntimeError(f"count must be positive, got {count}")
    backward(grad_out, x, weight, bias, mean, invstd)


def eval_(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
) -> None:
    """``batch_norm_eval``'s arguments."""
    arguments(x, weight, bias, running_mean, running_var)


def update(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    num_batches_tracked: Tensor | None = None,
) -> None:
    """``update_running_stats``'s arguments (a running statistic may be None for the Triton
    kernel's own API): every one checked before anything is written."""
    channels, device = mean.numel(), mean.device
    _statistic(mean, "mean", channels, device)
    _statistic(invstd, "invstd", channels, device)
    if invstd.dtype != mean.dtype:
        raise RuntimeError(
            f"expected scalar type {dtype_name(mean.dtype)} but found {dtype_name(invstd.dtype)}"
        )
    stats = ((running_mean, "running_mean"), (running_var, "running_var"))
    for t, name in stats:
        _size(t, name, channels)
    for t, name in stats:
        _untracked(t, name)
    for t, _ in stats:
        _device(t, device)
    given = [t for t, _ in stats if t is not None]
    for t in given:  # as torch: the statistics' dtype, or float16/bfloat16 with float32 ones
        if not (t.dtype == mean.dtype or (mean.dtype == torch.float32 and t.dtype in REDUCED)):
            raise RuntimeError(
                f"expected scalar type {dtype_name(mean.dtype)} but found {dtype_name(t.dtype)}"
            )
    if len(given) == 2 and given[1].dtype != given[0].dtype:
        raise RuntimeError(
            f"expected scalar type {dtype_name(given[0].dtype)} but found "
            f"{dtype_name(given[1].dtype)}"
        )
    for t, name in stats:
        _running_layout(t, name, written=True)
    # the counter: any tensor torch's module could add 1 to, on the statistics' device
    counter = num_batches_tracked
    if counter is not None and counter.device != device:
        raise RuntimeError(f"num_batches_tracked must be on the {device}, got {counter.device}")


# ------------------------------------------------------------------------ F.batch_norm's


def sizes(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
) -> None:
    """torch's first checks: each parameter's number of values."""
    channels = _channels(x)
    _size(running_mean, "running_mean", channels)
    _size(running_var, "running_var", channels)
    _size(weight, "weight", channels)
    _size(bias, "bias", channels)


def placed(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
) -> None:
    """torch's checks before it looks at dtypes: the parameters' sizes, the input's
    dimensions, the running statistics not tracked by autograd, the devices. (torch refuses
    one running statistic without the other after these.)"""
    sizes(x, weight, bias, running_mean, running_var)
    _input_shape(x)
    _untracked(running_mean, "running_mean")
    _untracked(running_var, "running_var")
    for t in (running_mean, running_var, weight, bias):
        _device(t, x.device)


def arguments(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    written: bool = False,
) -> None:
    """torch's checks of ``F.batch_norm``'s tensors (after its own of the batch size and eps,
    and of the running statistics given together), in torch's order: the parameters' sizes,
    the input's dimensions, the running statistics not tracked by autograd, the devices, the
    input's dtype, the dtype rule over all four, the running statistics 1-d (and, ``written``
    in training, no two values in one place)."""
    placed(x, weight, bias, running_mean, running_var)
    _input_dtype(x)
    dtypes(x, weight, bias, running_mean, running_var)
    _running_layout(running_mean, "running_mean", written)
    _running_layout(running_var, "running_var", written)


def statistics_table(x: Tensor, parts: int, part: int) -> None:
    """``batch_norm_stats_table``'s arguments: ``part`` one of the ``parts`` rows, ``x``
    an input the kernels compute."""
    if not (parts >= 1 and 0 <= part < parts):
        raise RuntimeError(
            f"part must be one of the parts' rows, 0 to parts - 1, got part {part} of {parts}"
        )
    _input_shape(x)
    _input_dtype(x)


def merge_statistics(table: Tensor, dtype: torch.dtype) -> None:
    """``batch_norm_merge_stats``'s arguments: a float64 ``(parts, 1 + 2C)`` table,
    statistics of float32 or float64."""
    shape = table.shape
    if not (table.dim() == 2 and shape[0] >= 1 and shape[1] >= 3 and shape[1] % 2 == 1):
        raise RuntimeError(f"table must be (parts, 1 + 2C) with C >= 1, got {list(shape)}")
    if table.dtype != torch.float64:
        raise RuntimeError(f"expected scalar type Double but found {dtype_name(table.dtype)}")
    if dtype not in (torch.float32, torch.float64):
        raise RuntimeError(
            f"the statistics' dtype must be Float or Double, got {dtype_name(dtype)}"
        )
