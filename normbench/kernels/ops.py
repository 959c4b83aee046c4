"""normbench's BatchNorm as torch operators (``torch.library.custom_op``), on any backend.

Four operators, each with a fake (meta) implementation so ``torch.compile`` can
trace them:

- ``normbench::batch_norm_forward(x, weight, bias, eps, backend) -> (y, mean, invstd)``,
  functional, differentiable through ``register_autograd``, whose backward is
- ``normbench::batch_norm_backward(dy, x, weight, mean, invstd, backend) -> (dx, dweight, dbias)``;
- ``normbench::update_running_stats(running_mean!, running_var!, mean, invstd, momentum, eps,
  count)``, which declares the running statistics as mutated (torch refuses autograd on a
  mutating operator, so the update is an operator of its own);
- ``normbench::batch_norm_eval(x, running_mean, running_var, weight, bias, eps, backend) -> y``,
  a single affine pass, differentiable.

``backend`` names the kernel: ``cpu`` (the compiled C++ kernel), ``triton`` (CUDA, or
the CPU under ``TRITON_INTERPRET=1``) or ``reference`` (plain torch operations); the
callers resolve ``auto`` with :func:`resolve_backend` before calling.

Callers use :func:`forward_train`, :func:`update_stats` and :func:`forward_eval`. In
plain eager execution these skip the dispatcher and call the same kernels through an
``autograd.Function``: the operators' Python dispatch and autograd wrappers cost about
100 us per layer and step, more than the kernel itself on small tensors. Under
``torch.compile``, a dispatch mode (``make_fx``, fake tensors) or a functorch transform,
they call the operators. Both paths run the same kernels and are tested against
each other.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from normbench.kernels import cpu, reference

BACKENDS: tuple[str, ...] = ("auto", "cpu", "triton", "reference")


def _triton() -> ModuleType | None:
    from normbench.kernels import triton_kernels

    return triton_kernels if triton_kernels.available() else None


def resolve_backend(backend: str, x: Tensor) -> str:
    """The kernel that runs ``x``: ``auto`` picks by device; a kernel that cannot is refused.

    ``auto``: the C++ kernel on the CPU (the reference where it could not be compiled,
    with one warning), Triton on CUDA (the reference where Triton is missing).
    """
    # is_cpu, is_cuda: x.device builds a torch.device, ~8 us when the caches are cold
    if backend == "auto":
        if x.is_cpu:
            return "cpu" if cpu.extension() is not None else "reference"
        if x.is_cuda and _triton() is not None:
            return "triton"
        return "reference"
    if backend == "cpu":
        if not x.is_cpu:
            raise ValueError(f"norm backend 'cpu' runs CPU tensors, got a {x.device.type} tensor")
        return "cpu" if cpu.extension() is not None else "reference"
    if backend == "triton":
        triton = _triton()
        if triton is None:
            raise ValueError("norm backend 'triton' needs the triton package")
        if not x.is_cuda and not triton.interpreted():
            raise ValueError(
                "norm backend 'triton' runs CUDA tensors (or CPU ones under TRITON_INTERPRET=1)"
            )
        return "triton"
    if backend == "reference":
        return "reference"
    raise ValueError(f"unknown norm backend {backend!r}; valid: {', '.join(BACKENDS)}")


def kernel(backend: str) -> ModuleType:
    """The module implementing a resolved backend's four functions."""
    if backend == "cpu":
        return cpu.extension()
    if backend == "triton":
        return _triton()
    return reference


def _statistics_like(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[1], dtype=reference.accumulation_dtype(x.dtype))


# ------------------------------------------------------------------------------ training


@torch.library.custom_op("normbench::batch_norm_forward", mutates_args=())
def batch_norm_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(kernel(backend).forward_train(x, weight, bias, eps))


@batch_norm_forward.register_fake
def _(x, weight, bias, eps, backend):
    return torch.empty_like(x), _statistics_like(x), _statistics_like(x)


@torch.library.custom_op("normbench::batch_norm_backward", mutates_args=())
def batch_norm_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(kernel(backend).backward(grad_out, x, weight, mean, invstd))


@batch_norm_backward.register_fake
def _(grad_out, x, weight, mean, invstd, backend):
    return torch.empty_like(x), _statistics_like(x), _statistics_like(x)


def _forward_setup(ctx, inputs, output) -> None:
    x, weight, bias, _eps, backend = inputs
    _, mean, invstd = output
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.backend = backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _forward_backward(ctx, grad_y, _grad_mean, _grad_invstd, backward=None):
    x, weight, mean, invstd = ctx.saved_tensors
    backward = backward or batch_norm_backward
    dx, dweight, dbias = backward(grad_y, x, weight, mean, invstd, ctx.backend)
    need = ctx.needs_input_grad
    return (
        dx if need[0] else None,
        dweight.to(weight.dtype) if need[1] else None,
        dbias.to(ctx.bias_dtype) if need[2] else None,
        None,
        None,
    )


batch_norm_forward.register_autograd(_forward_backward, setup_context=_forward_setup)


@torch.library.custom_op(
    "normbench::update_running_stats", mutates_args=("running_mean", "running_var")
)
def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    invstd: Tensor,
    momentum: float,
    eps: float,
    count: int,
) -> None:
    _update_kernel(running_mean).update_running_stats(
        running_mean, running_var, mean, invstd, momentum, eps, count
    )


def _update_kernel(running_mean: Tensor) -> ModuleType:
    # A (C,) update: the C++ loop on the CPU, torch operations elsewhere.
    module = cpu.extension() if running_mean.is_cpu else None
    return module or reference


@update_running_stats.register_fake
def _(running_mean, running_var, mean, invstd, momentum, eps, count):
    return None


# ------------------------------------------------------------------------------ eval


@torch.library.custom_op("normbench::batch_norm_eval", mutates_args=())
def batch_norm_eval(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    backend: str,
) -> Tensor:
    return kernel(backend).forward_eval(x, running_mean, running_var, weight, bias, eps)


@batch_norm_eval.register_fake
def _(x, running_mean, running_var, weight, bias, eps, backend):
    return torch.empty_like(x)


def _eval_setup(ctx, inputs, output) -> None:
    x, running_mean, running_var, weight, _bias, eps, _backend = inputs
    ctx.save_for_backward(x, running_mean, running_var, weight)
    ctx.eps = eps


def _eval_backward(ctx, grad_y):
    # Rarely needed (fine-tuning through frozen statistics): plain torch operations.
    x, running_mean, running_var, weight = ctx.saved_tensors
    shape = (1, -1, *([1] * (x.dim() - 2)))
    dims = [0, *range(2, x.dim())]
    invstd = torch.rsqrt(running_var.double() + ctx.eps).to(grad_y.dtype)
    scale = invstd if weight is None else invstd * weight.to(grad_y.dtype)
    need = ctx.needs_input_grad
    dx = grad_y * scale.reshape(shape) if need[0] else None
    dweight = dbias = None
    if need[3]:
        xhat = (x - running_mean.to(x.dtype).reshape(shape)) * invstd.reshape(shape)
        dweight = (grad_y * xhat).sum(dims).to(weight.dtype)
    if need[4]:
        dbias = grad_y.sum(dims)
    return dx, None, None, dweight, dbias, None, None


batch_norm_eval.register_autograd(_eval_backward, setup_context=_eval_setup)


# ------------------------------------------------------------------------------ entry points


def plain_eager(x: Tensor) -> bool:
    """Plain eager execution: nothing traces, fakes or transforms the call."""
    return (
        type(x) is torch.Tensor
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._are_functorch_transforms_active()
    )


def _direct_backward(grad_y, x, weight, mean, invstd, backend):
    return kernel(backend).backward(grad_y, x, weight, mean, invstd)


class _EagerForward(torch.autograd.Function):
    """``batch_norm_forward`` without the dispatcher: the same kernel and backward."""

    @staticmethod
    def forward(x, weight, bias, eps, backend):
        return tuple(kernel(backend).forward_train(x, weight, bias, eps))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _forward_setup(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1], output[2])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_mean, grad_invstd):
        return _forward_backward(ctx, grad_y, grad_mean, grad_invstd, _direct_backward)


def train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, invstd)`` with the batch's statistics, and the running statistics
    updated in place when both are given; ``backend`` resolved.

    Eager on the CPU this is one call into the C++ extension, whose autograd node is
    C++ too; elsewhere the forward, then the update.
    """
    update = running_mean is not None and running_var is not None
    if plain_eager(x):
        if backend == "cpu":
            return cpu.extension().train(
                x,
                weight,
                bias,
                running_mean if update else None,
                running_var if update else None,
                None,
                momentum,
                eps,
            )
        y, mean, invstd = _EagerForward.apply(x, weight, bias, eps, backend)
        if update:
            _update_kernel(running_mean).update_running_stats(
                running_mean, running_var, mean, invstd, momentum, eps, x.numel() // x.shape[1]
            )
        return y, mean, invstd
    y, mean, invstd = batch_norm_forward(x, weight, bias, eps, backend)
    # register_autograd cannot mark outputs non-differentiable; the statistics are not.
    mean, invstd = mean.detach(), invstd.detach()
    if update:
        count = x.numel() // x.shape[1]
        update_running_stats(running_mean, running_var, mean, invstd, momentum, eps, count)
    return y, mean, invstd


def forward_eval(x, running_mean, running_var, weight, bias, eps: float, backend: str) -> Tensor:
    """``y`` normalised with the running statistics; ``backend`` resolved."""
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    )
    if plain_eager(x) and not differentiable:
        return kernel(backend).forward_eval(x, running_mean, running_var, weight, bias, eps)
    return batch_norm_eval(x, running_mean, running_var, weight, bias, eps, backend)
