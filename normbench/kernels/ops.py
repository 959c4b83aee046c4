"""normbench's BatchNorm as torch operators: one dispatch path, on every device.

The operators are defined in C++ (``batchnorm_cpu.cpp``, ``TORCH_LIBRARY(normbench)``),
which also registers their CPU kernels and their autograd, once for every device:

- ``normbench::batch_norm_forward(x, weight?, bias?, eps, relu=False) -> (y, mean, invstd)``,
  differentiable in ``y``, whose backward is
- ``normbench::batch_norm_backward(grad_out, x, weight?, bias?, mean, invstd, relu=False)
  -> (dx, dweight, dbias)``;
- ``normbench::batch_norm_eval(x, running_mean, running_var, weight?, bias?, eps,
  relu=False) -> y``, a single affine pass, differentiable;
- ``normbench::update_running_stats(running_mean!, running_var!, mean, invstd, momentum,
  eps, count, num_batches_tracked!?, cumulative=False)``, the running statistics updated
  in place (the batch counter incremented first, when given: ``cumulative`` then makes
  the factor 1 / the new count);
- ``normbench::batch_norm_stats(x, eps) -> (mean, invstd)``, the batch's statistics alone,
  as the forward computes them (not differentiable), for variants that need them before
  they normalise (batch renormalization).
- ``normbench::batch_norm_backward_reduce(grad_out, x, weight?, bias?, mean, invstd,
  relu=False) -> (sum_dy_xhat, sum_dy)`` and ``normbench::batch_norm_backward_apply(grad_out,
  x, weight?, bias?, mean, invstd, sum_dy, sum_dy_xhat, count, relu=False) -> dx``: the
  backward's two passes apart (its sums, which are ``dweight`` and ``dbias``; ``dx`` from
  sums and a count given), for synchronized BatchNorm, whose processes add up their sums
  in between (:mod:`normbench.distributed`). Not differentiable. On CUDA they run as plain
  torch operations (:mod:`normbench.kernels.reference`'s), not Triton kernels.
- ``normbench::batch_norm_stats_table(x, parts, part) -> table`` and
  ``normbench::batch_norm_merge_stats(table, eps, dtype) -> (mean, var, invstd, count)``:
  synchronized BatchNorm's statistics around its all_reduce, each one call: the local
  part's count, mean and M2 in row ``part`` of a zeroed ``(parts, 1 + 2C)`` float64 table,
  and the rows (summed over the processes) merged in float64 by Chan et al.'s formula into
  statistics of ``dtype`` and the total count (an int64 scalar). On CUDA plain torch
  operations (the reference's).
- ``normbench::relu_pool_forward(x, weight?, bias?, mean, invstd) -> (out, choice)`` and
  ``normbench::relu_pool_backward(grad_out, x, choice, weight?, bias?, mean, invstd,
  batch_stats=True) -> (dx, dweight, dbias)`` (``batch_stats=False``: the statistics are
  constants, as running ones are): the norm with statistics given, its ReLU and a 2x2 max-pooling
  of stride 2 in one pass each way (``choice``: which of its window's four values each
  output took, a byte, 255 where the ReLU zeroed it). CPU only, channels_last float32,
  float64, bfloat16 and float16 (the last two computed in float32: ``relu_pool`` here; the
  layers compose the unfused operators elsewhere).
- ``normbench::stream_threshold() -> int``: the bytes from which the CPU kernels write
  their outputs with streaming stores (``NORMBENCH_KERNEL_STREAM_BYTES``, else a quarter
  of the last-level cache), for reports such as ``normbench bench``'s.
- ``normbench::plane_order(x, backward=False) -> str``: the order the CPU kernels read
  ``x`` in: ``rows`` (channels_last, 2-d), else ``channels`` (tasks own blocks of
  channels) or ``samples`` (tasks own runs of samples: inputs larger than the core's L2
  that fit half the last-level cache, or whose channel blocks would not fit the
  L2; ``NORMBENCH_KERNEL_PLANE_ORDER`` forces one), for the forward or, with
  ``backward``, the backward, which reads ``dy`` too.
- ``normbench::pool_bytes() -> int`` and ``normbench::pool_limit() -> int``: the bytes of
  freed outputs that the CPU kernels keep to reuse for the next outputs of the same size
  (so that a training step does not page-fault its outputs in again), and the most they
  keep (``NORMBENCH_KERNEL_POOL_BYTES``, else 1/16 of physical memory, at most 1 GiB);
  ``normbench::empty_pool() -> int`` frees what it keeps (the bytes freed).

``relu=True`` fuses the ReLU that models apply after the norm: the forward writes the
activated output and the backward masks the gradient inside its own passes. Here, in
Python: each operator's fake implementation (shapes only, for ``torch.compile`` and meta
tensors, after the operator's own checks: :mod:`normbench.kernels.checks`) and the Triton
kernels as their CUDA implementation (:func:`register_python_implementations`, run once
by :func:`library` after the C++ library loads). Every call,
eager, compiled or traced, goes through the dispatcher to the device's kernel; there is
no second path.

``backend`` (a norm's option): ``auto`` (the operators, on CPU and CUDA tensors),
``cpu`` or ``triton`` (the same operators, and the tensors must be on that device), or
``reference``: :mod:`normbench.kernels.reference`, plain torch operations that autograd
differentiates as they are. It is the specification the kernels are tested against, and
what runs where the operators' library cannot be built (with one warning).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import Tensor

from normbench.kernels import checks, cpu, reference

BACKENDS: tuple[str, ...] = ("auto", "cpu", "triton", "reference")

# The operators' overloads, looked up once the library is loaded (an attribute lookup on
# torch.ops costs microseconds per call).
_forward = _eval = _update = _stats = _reduce = _apply = _table = _merge = None
_pool_forward = _pool_backward = None


def _triton() -> ModuleType | None:
    # imported on first use, not with the package: runs on the CPU never import triton
    from normbench.kernels import triton_launch

    return triton_launch if triton_launch.available() else None


def library():
    """``torch.ops.normbench`` with every implementation registered, or None where the
    library cannot be built: :func:`normbench.kernels.cpu.extension` (the C++ library,
    built and loaded on first use), then, once, :func:`register_python_implementations`,
    whose failure is the library's (the reference runs instead, with one warning)."""
    loaded = cpu.extension()
    if loaded is not None and _forward is None:  # loaded, its Python implementations not yet
        try:
            register_python_implementations()
        except Exception as err:  # a broken triton, say: the same fallback as a failed build
            cpu.fall_back(err)
            return None
    return loaded


def resolve_backend(backend: str, x: Tensor) -> str:
    """What runs ``x``: ``cpu`` or ``triton`` (the operators, whose dispatcher picks the
    device's kernel) or ``reference``. ``auto`` picks by device; a backend that cannot run
    ``x`` is refused with a ValueError.

    ``auto``: the operators on CPU and CUDA tensors (the reference where the library could
    not be built, or, on CUDA, where Triton is missing), the reference on other devices.
    """
    # is_cpu, is_cuda: x.device builds a torch.device, microseconds when the caches are cold
    if backend == "auto":
        if x.is_cpu:
            return "cpu" if library() is not None else "reference"
        if x.is_cuda and _triton() is not None and library() is not None:
            return "triton"
        return "reference"
    if backend == "cpu":
        if not x.is_cpu:
            raise ValueError(f"norm backend 'cpu' runs CPU tensors, got a {x.device.type} tensor")
        return "cpu" if library() is not None else "reference"
    if backend == "triton":
        if _triton() is None:
            raise ValueError("norm backend 'triton' needs the triton package")
        if not x.is_cuda:
            raise ValueError(
                f"norm backend 'triton' runs CUDA tensors, got a {x.device.type} tensor"
            )
        return "triton" if library() is not None else "reference"
    if backend == "reference":
        return "reference"
    raise ValueError(f"unknown norm backend {backend!r}; valid: {', '.join(BACKENDS)}")


# ------------------------------------------------------------------------------ entry points


def train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    backend: str,
    relu: bool = False,
    num_batches_tracked: Tensor | None = None,
    cumulative: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, invstd)`` with the batch's statistics (``y`` through a ReLU with
    ``relu``), and the running statistics updated in place when both are given, after
    ``num_batches_tracked`` is incremented (with them only; ``cumulative``: the factor is
    1 / its new value); ``backend`` resolved, the input checked
    (:mod:`normbench.kernels.function`)."""
    update = running_mean is not None and running_var is not None
    if backend == "reference":
        checks.arguments(x, weight, bias, running_mean, running_var, written=True)
        y, mean, invstd = reference.forward_train(x, weight, bias, eps)
        if relu:
            y = torch.relu(y)
        mean, invstd = mean.detach(), invstd.detach()
        if update:
            if num_batches_tracked is not None:
                momentum = count_batch(num_batches_tracked, momentum, cumulative)
            count = x.numel() // x.shape[1]
            reference.update_running_stats(
                running_mean, running_var, mean, invstd, momentum, eps, count
            )
        return y, mean, invstd
    y, mean, invstd = _forward(x, weight, bias, eps, relu)
    if update:
        count = x.numel() // x.shape[1]
        _update(
            running_mean, running_var, mean, invstd, momentum, eps, count,
            num_batches_tracked, cumulative,
        )  # fmt: skip
    return y, mean, invstd


def update(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    invstd: Tensor,
    momentum: float,
    eps: float,
    count: int,
    backend: str,
    num_batches_tracked: Tensor | None = None,
    cumulative: bool = False,
) -> None:
    """The running statistics moved towards a batch's ``(mean, invstd)`` of ``count`` values
    per channel (the variance unbiased by ``count``), ``num_batches_tracked`` incremented
    first when given; ``backend`` resolved. For statistics not of the training forward's own
    (a synchronized group's)."""
    if backend == "reference":
        checks.update(running_mean, running_var, mean, invstd, num_batches_tracked)
        if num_batches_tracked is not None:
            momentum = count_batch(num_batches_tracked, momentum, cumulative)
        reference.update_running_stats(
            running_mean, running_var, mean, invstd, momentum, eps, count
        )
        return
    _update(
        running_mean, running_var, mean, invstd, momentum, eps, count,
        num_batches_tracked, cumulative,
    )  # fmt: skip


def forward_eval(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    backend: str,
    relu: bool = False,
) -> Tensor:
    """``y`` normalised with the running statistics (then the ReLU with ``relu``);
    ``backend`` resolved."""
    if backend == "reference":
        checks.arguments(x, weight, bias, running_mean, running_var)
        y = reference.forward_eval(x, running_mean, running_var, weight, bias, eps)
        return torch.relu(y) if relu else y
    return _eval(x, running_mean, running_var, weight, bias, eps, relu)


def count_batch(num_batches_tracked: Tensor, momentum: float, cumulative: bool) -> float:
    """torch's batch counter incremented; the running statistics' factor: 1 / the new
    count for a cumulative average (``momentum=None``), else ``momentum``. (The C++
    update does the same in its own call.)"""
    num_batches_tracked.add_(1)
    return 1.0 / float(num_batches_tracked) if cumulative else momentum


def statistics(x: Tensor, eps: float, backend: str) -> tuple[Tensor, Tensor]:
    """The batch's ``(mean, invstd)`` alone, without gradient; ``backend`` resolved."""
    with torch.no_grad():
        if backend == "reference":
            checks.forward(x, None, None)
            _, mean, invstd = reference.forward_train(x, None, None, eps)
            return mean, invstd
        return _stats(x, eps)


def backward_reduce(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    backend: str,
    relu: bool = False,
) -> tuple[Tensor, Tensor]:
    """The backward's sums per channel, ``(sum(g * xhat), sum(g))`` (the local ``dweight``
    and ``dbias``), without ``dx``; ``backend`` resolved."""
    if backend == "reference":
        checks.backward(dy, x, weight, bias, mean, invstd)
        return reference.backward_reduce(dy, x, weight, bias, mean, invstd, relu)
    return _reduce(dy, x, weight, bias, mean, invstd, relu)


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
    backend: str,
    relu: bool = False,
) -> Tensor:
    """``dx`` from the sums of a whole batch of ``count`` values per channel (a
    synchronized group's); ``backend`` resolved."""
    if backend == "reference":
        checks.backward_apply(dy, x, weight, bias, mean, invstd, sum_dy, sum_dy_xhat, count)
        return reference.backward_apply(
            dy, x, weight, bias, mean, invstd, sum_dy, sum_dy_xhat, count, relu
        )
    return _apply(dy, x, weight, bias, mean, invstd, sum_dy, sum_dy_xhat, count, relu)


def relu_pool_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor
) -> tuple[Tensor, Tensor]:
    """``(max_pool2d(relu(y), 2), choice)`` with ``y`` normalised by the ``(mean, invstd)``
    given, in one pass (the CPU operator: :func:`relu_pool_applies` says where it runs)."""
    return _pool_forward(x, weight, bias, mean, invstd)


def relu_pool_backward(
    grad_out: Tensor,
    x: Tensor,
    choice: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    batch_stats: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` of :func:`relu_pool_forward`: with ``batch_stats`` the
    statistics are the batch's (their gradient included, as ``batch_norm_backward``'s),
    else constants (running statistics)."""
    return _pool_backward(grad_out, x, choice, weight, bias, mean, invstd, batch_stats)


def relu_pool_applies(x: Tensor, backend: str) -> bool:
    """Whether :func:`relu_pool_forward` runs ``x`` (``backend`` unresolved): a
    channels_last (N, C, H, W) float32, float64, bfloat16 or float16 CPU tensor of at
    least one value and 2x2 planes, on the ``cpu`` backend."""
    return (
        x.dim() == 4
        and x.dtype in checks.POOLED_DTYPES
        and x.shape[2] >= 2
        and x.shape[3] >= 2
        and x.numel() > 0
        and x.is_cpu
        and x.is_contiguous(memory_format=torch.channels_last)
        and backend in ("auto", "cpu")
        and resolve_backend(backend, x) == "cpu"
    )


def statistics_table(x: Tensor, parts: int, part: int, backend: str) -> Tensor:
    """``x``'s count, mean and M2 per channel in row ``part`` of a zeroed ``(parts, 1 + 2C)``
    float64 table (synchronized BatchNorm's, summed over its processes); ``backend``
    resolved."""
    if backend == "reference":
        checks.statistics_table(x, parts, part)
        with torch.no_grad():
            return reference.statistics_table(x, parts, part)
    return _table(x, parts, part)


def merge_statistics(
    table: Tensor, eps: float, dtype: torch.dtype, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A summed :func:`statistics_table`'s rows merged: ``(mean, var, invstd)`` of ``dtype``
    and the total count (an int64 scalar); ``backend`` resolved."""
    if backend == "reference":
        checks.merge_statistics(table, dtype)
        return reference.merge_statistics(table, eps, dtype)
    return _merge(table, eps, dtype)


# ------------------------------------------------------------------------------ registrations


def _statistics_like(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[1], dtype=reference.accumulation_dtype(x.dtype))


# The fakes check what the operators check (checks.py mirrors batchnorm_cpu.cpp), so that a
# traced call fails where an eager one does, and a meta tensor beside a CPU one (which the
# dispatcher hands to these) is refused as torch refuses it.


def _fake_forward(x, weight, bias, eps, relu=False):
    checks.forward(x, weight, bias)
    return torch.empty_like(x), _statistics_like(x), _statistics_like(x)


def _fake_backward(grad_out, x, weight, bias, mean, invstd, relu=False):
    checks.backward(grad_out, x, weight, bias, mean, invstd)
    return torch.empty_like(x), _statistics_like(x), _statistics_like(x)


def _fake_eval(x, running_mean, running_var, weight, bias, eps, relu=False):
    checks.eval_(x, running_mean, running_var, weight, bias)
    return torch.empty_like(x)


def _fake_update(
    running_mean, running_var, mean, invstd, momentum, eps, count, counter=None, cumulative=False
):
    checks.update(running_mean, running_var, mean, invstd, counter)
    _check_cumulative(counter, cumulative)
    return None


def _fake_stats(x, eps):
    checks.forward(x, None, None)
    return _statistics_like(x), _statistics_like(x)


def _fake_reduce(grad_out, x, weight, bias, mean, invstd, relu=False):
    checks.backward(grad_out, x, weight, bias, mean, invstd)
    return _statistics_like(x), _statistics_like(x)


def _fake_apply(grad_out, x, weight, bias, mean, invstd, sum_dy, sum_dy_xhat, count, relu=False):
    checks.backward_apply(grad_out, x, weight, bias, mean, invstd, sum_dy, sum_dy_xhat, count)
    return torch.empty_like(x)


def _fake_pool_forward(x, weight, bias, mean, invstd):
    checks.pooled(x, weight, bias, mean, invstd)
    n, c, h, w = x.shape
    out = x.new_empty((n, c, h // 2, w // 2)).contiguous(memory_format=torch.channels_last)
    return out, x.new_empty((n, h // 2, w // 2, c), dtype=torch.uint8)


def _fake_pool_backward(grad_out, x, choice, weight, bias, mean, invstd, batch_stats=True):
    checks.pooled_backward(grad_out, x, choice, weight, bias, mean, invstd)
    return torch.empty_like(x), _statistics_like(x), _statistics_like(x)


def _fake_table(x, parts, part):
    checks.statistics_table(x, parts, part)
    return x.new_empty((parts, 1 + 2 * x.shape[1]), dtype=torch.float64)


def _fake_merge(table, eps, dtype):
    checks.merge_statistics(table, dtype)
    channels = (table.shape[1] - 1) // 2
    stat = table.new_empty(channels, dtype=dtype)
    return (
        stat,
        torch.empty_like(stat),
        torch.empty_like(stat),
        table.new_empty((), dtype=torch.long),
    )


def _check_cumulative(counter, cumulative: bool) -> None:
    if cumulative and counter is None:
        raise RuntimeError("a cumulative average needs num_batches_tracked")


FAKES = {
    "batch_norm_forward": _fake_forward,
    "batch_norm_backward": _fake_backward,
    "batch_norm_eval": _fake_eval,
    "update_running_stats": _fake_update,
    "batch_norm_stats": _fake_stats,
    "batch_norm_backward_reduce": _fake_reduce,
    "batch_norm_backward_apply": _fake_apply,
    "batch_norm_stats_table": _fake_table,
    "batch_norm_merge_stats": _fake_merge,
    "relu_pool_forward": _fake_pool_forward,
    "relu_pool_backward": _fake_pool_backward,
}


def _triton_implementations() -> dict:
    """The Triton kernels in the operators' signatures (the ReLU fused into their passes)."""
    tk = _triton()

    def forward(x, weight, bias, eps, relu=False):
        return tk.forward_train(x, weight, bias, eps, relu)

    def backward(grad_out, x, weight, bias, mean, invstd, relu=False):
        return tk.backward(grad_out, x, weight, mean, invstd, bias, relu)

    def forward_eval(x, running_mean, running_var, weight, bias, eps, relu=False):
        return tk.forward_eval(x, running_mean, running_var, weight, bias, eps, relu)

    def update(
        running_mean, running_var, mean, invstd, momentum, eps, count,
        counter=None, cumulative=False,
    ):  # fmt: skip
        # every argument checked before the batch is counted (the kernel checks its own again)
        checks.update(running_mean, running_var, mean, invstd, counter)
        _check_cumulative(counter, cumulative)
        if counter is not None:  # float(counter), as torch's module reads it: a sync on CUDA
            momentum = count_batch(counter, momentum, cumulative)
        tk.update_running_stats(running_mean, running_var, mean, invstd, momentum, eps, count)

    def stats(x, eps):  # the forward's statistics; its output is not needed
        _, mean, invstd = tk.forward_train(x, None, None, eps)
        return mean, invstd

    def backward_reduce(grad_out, x, weight, bias, mean, invstd, relu=False):
        checks.backward(grad_out, x, weight, bias, mean, invstd)
        return reference.backward_reduce(grad_out, x, weight, bias, mean, invstd, relu)

    def backward_apply(
        grad_out, x, weight, bias, mean, invstd, sum_dy, sum_dy_xhat, count, relu=False
    ):
        checks.backward_apply(grad_out, x, weight, bias, mean, invstd, sum_dy, sum_dy_xhat, count)
        return reference.backward_apply(
            grad_out, x, weight, bias, mean, invstd, sum_dy, sum_dy_xhat, count, relu
        )

    def stats_table(x, parts, part):
        checks.statistics_table(x, parts, part)
        return reference.statistics_table(x, parts, part)

    def merge_stats(table, eps, dtype):
        checks.merge_statistics(table, dtype)
        return reference.merge_statistics(table, eps, dtype)

    return {
        "batch_norm_forward": forward,
        "batch_norm_backward": backward,
        "batch_norm_eval": forward_eval,
        "update_running_stats": update,
        "batch_norm_stats": stats,
        # plain torch operations on CUDA (synchronized BatchNorm's two halves of the backward)
        "batch_norm_backward_reduce": backward_reduce,
        "batch_norm_backward_apply": backward_apply,
        # and its statistics' table and merge
        "batch_norm_stats_table": stats_table,
        "batch_norm_merge_stats": merge_stats,
    }


_libraries: list = []  # kept alive: a Library's registrations end with it


def register_python_implementations() -> None:
    """The operators' fake implementations, and the Triton kernels for CUDA where CUDA is
    available and Triton installed; once, after the C++ library has defined the operators."""
    global _forward, _eval, _update, _stats, _reduce, _apply, _table, _merge
    global _pool_forward, _pool_backward
    if _forward is not None:  # registered already
        return
    for name, fake in FAKES.items():
        torch.library.register_fake(f"normbench::{name}")(fake)
    # CUDA tensors exist only where CUDA does: a run on a machine without it never imports
    # triton (a fifth of a second of every run's start)
    if torch.cuda.is_available() and _triton() is not None:
        library = torch.library.Library("normbench", "IMPL")
        for name, fn in _triton_implementations().items():
            library.impl(name, fn, "CUDA")
        _libraries.append(library)
    ops = torch.ops.normbench
    _forward = ops.batch_norm_forward.default
    _eval = ops.batch_norm_eval.default
    _update = ops.update_running_stats.default
    _stats = ops.batch_norm_stats.default
    _reduce = ops.batch_norm_backward_reduce.default
    _apply = ops.batch_norm_backward_apply.default
    _table = ops.batch_norm_stats_table.default
    _merge = ops.batch_norm_merge_stats.default
    _pool_forward = ops.relu_pool_forward.default
    _pool_backward = ops.relu_pool_backward.default


@contextlib.contextmanager
def triton_on_cpu() -> Iterator[None]:
    """Tests under ``TRITON_INTERPRET=1``, which runs Triton programs on CPU tensors: within
    the block the operators' CPU implementations are the Triton kernels (the C++ kernels
    are back after it), so the whole path (dispatcher, autograd, fakes) runs them."""
    assert library() is not None, cpu.failure()
    tk = _triton()
    assert tk is not None and tk.interpreted(), "needs triton and TRITON_INTERPRET=1"
    override = torch.library.Library("normbench", "IMPL")
    try:
        with _quiet_override():
            for name, fn in _triton_implementations().items():
                override.impl(name, fn, "CPU")
        yield
    finally:
        override._destroy()


@contextlib.contextmanager
def _quiet_override() -> Iterator[None]:
    # The dispatcher warns when a kernel replaces another for the same key: wanted here.
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
        yield
