"""The operators' argument checks in Python: the rules and messages of ``batchnorm_cpu.cpp``'s.

The C++ operators check every tensor before they read its pointer (see "argument checks" in
``batchnorm_cpu.cpp``). The implementations registered from Python check the same, with
these functions: the Triton kernels (CUDA, or CPU tensors under Triton's interpreter) before
they launch, and the fake implementations (meta tensors, ``torch.compile``), so that a
traced call fails where an eager one does and a meta tensor beside a CPU one is refused as
torch refuses it. :func:`arguments` is torch's whole ``F.batch_norm`` contract, for the paths
that reach no operator (the reference backend, an empty batch) and for the one check no
single operator can make (the running statistics' dtype against the weight's and the
input's: the training forward and the update are two operators).

The messages are torch's where torch refuses the same argument; the exception types are
torch's: RuntimeError, NotImplementedError for an input dtype nothing computes in,
IndexError for an input of fewer than 2 dimensions, ValueError for zero channels.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "arguments",
    "backward",
    "dtypes",
    "eval_",
    "forward",
    "input_",
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


def input_(x: Tensor) -> None:
    """``(N, C, *)`` with ``C > 0``, of a dtype the kernels compute in."""
    if x.dtype not in KERNEL_DTYPES:
        raise NotImplementedError(f"\"batch_norm\" not implemented for '{dtype_name(x.dtype)}'")
    if x.dim() < 2:
        dims = max(1, x.dim())
        raise IndexError(
            f"Dimension out of range (expected to be in range of [{-dims}, {dims - 1}], but got 1)"
        )
    if x.shape[1] == 0:
        raise ValueError(f"BatchNorm needs at least one channel, got input size {x.size()}")


def _per_channel(t: Tensor, name: str, channels: int, device: torch.device) -> None:
    if t.numel() != channels:
        raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")
    if t.device != device:
        raise RuntimeError(f"Tensor on device {t.device} is not on the expected device {device}!")


def _running(t: Tensor, name: str, channels: int, device: torch.device, written: bool) -> None:
    _per_channel(t, name, channels, device)
    if t.dim() != 1:
        raise RuntimeError(f"expected {name} to have 1 dims but tensor has {t.dim()}")
    if written and t.numel() > 1 and t.stride(0) == 0:
        raise RuntimeError(
            "unsupported operation: more than one element of the written-to tensor refers to "
            "a single memory location. Please clone() the tensor before performing the "
            "operation."
        )
    if torch.is_grad_enabled() and t.requires_grad:
        raise RuntimeError(
            f"The function 'batch_norm' is not differentiable with respect to argument "
            f"'{name}'. This input cannot have requires_grad True."
        )


def _statistic(t: Tensor, name: str, channels: int, device: torch.device) -> None:
    _per_channel(t, name, channels, device)
    if t.dtype not in KERNEL_DTYPES:
        raise RuntimeError(f"{name} must be a floating-point tensor, got {dtype_name(t.dtype)}")


def _affine(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> None:
    for t, name in ((weight, "weight"), (bias, "bias")):
        if t is not None:
            _per_channel(t, name, x.shape[1], x.device)


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


# ------------------------------------------------------------------------ the operators' own


def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> None:
    """``batch_norm_forward``'s and ``batch_norm_stats``'s arguments."""
    input_(x)
    _affine(x, weight, bias)
    dtypes(x, weight, bias)


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
    if grad_out.dtype != x.dtype:
        raise RuntimeError(
            f"expected scalar type {dtype_name(x.dtype)} but found {dtype_name(grad_out.dtype)}"
        )
    if grad_out.device != x.device:
        raise RuntimeError(
            f"Tensor on device {grad_out.device} is not on the expected device {x.device}!"
        )


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
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var")):
        if t is None:
            continue
        _running(t, name, channels, device, written=True)
        if not (t.dtype == mean.dtype or (mean.dtype == torch.float32 and t.dtype in REDUCED)):
            raise RuntimeError(
                f"expected scalar type {dtype_name(mean.dtype)} but found {dtype_name(t.dtype)}"
            )
    both = running_mean is not None and running_var is not None
    if both and running_var.dtype != running_mean.dtype:
        raise RuntimeError(
            f"expected scalar type {dtype_name(running_mean.dtype)} but found "
            f"{dtype_name(running_var.dtype)}"
        )
    counter = num_batches_tracked
    if counter is not None and (
        counter.dtype != torch.int64 or counter.numel() != 1 or counter.device != mean.device
    ):
        raise RuntimeError(
            f"num_batches_tracked must be a one-element int64 tensor on {mean.device}, got "
            f"{counter.numel()} {dtype_name(counter.dtype)} on {counter.device}"
        )


# ------------------------------------------------------------------------ F.batch_norm's


def arguments(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    written: bool = False,
) -> None:
    """torch's ``F.batch_norm`` checks of its tensors (after its own of the batch size and
    eps): the input, each parameter's size and device, the running statistics 1-d and not
    tracked by autograd (and, ``written`` in training, no two values in one place), and the
    dtype rule over all four."""
    input_(x)
    _affine(x, weight, bias)
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var")):
        if t is not None:
            _running(t, name, x.shape[1], x.device, written)
    dtypes(x, weight, bias, running_mean, running_var)
