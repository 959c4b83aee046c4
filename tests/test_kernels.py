"""The BatchNorm kernels (reference, compiled C++) and their operators vs float64 math and torch.

The Triton kernels have their own file (test_kernels_triton.py), run under the interpreter."""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch_contract import ONE_RUNNING_STATISTIC, eps_error, expected_error, torch_error

from normbench.kernels import batch_norm, batch_norm_tracked, batch_norm_train, cpu, ops, reference

SHAPES = [(8, 3), (4, 3, 5), (4, 3, 5, 6), (2, 3, 3, 4, 5)]
TOL32 = {"rtol": 1e-4, "atol": 1e-5}


def dims_but_1(x):
    return [0, *range(2, x.dim())]


def channel(t, ndim):
    return t.reshape(1, -1, *([1] * (ndim - 2)))


def bn64(x, weight=None, bias=None, eps=1e-5):
    """BatchNorm in float64, written out directly: (y, mean, biased var)."""
    x = x.double()
    dims = dims_but_1(x)
    mean = x.mean(dims)
    var = x.var(dims, unbiased=False)
    y = (x - channel(mean, x.dim())) / torch.sqrt(channel(var, x.dim()) + eps)
    if weight is not None:
        y = y * channel(weight.double(), x.dim())
    if bias is not None:
        y = y + channel(bias.double(), x.dim())
    return y, mean, var


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- reference forward ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_forward_train_matches_float64(shape, affine):
    x = torch.randn(shape) * 3 + 2
    c = shape[1]
    w, b = (torch.randn(c), torch.randn(c)) if affine else (None, None)
    y, mean, invstd = reference.forward_train(x, w, b, 1e-5)
    y64, mean64, var64 = bn64(x, w, b)
    assert y.dtype == torch.float32 and mean.shape == invstd.shape == (c,)
    torch.testing.assert_close(y.double(), y64, **TOL32)
    torch.testing.assert_close(mean.double(), mean64, **TOL32)
    torch.testing.assert_close(invstd.double(), torch.rsqrt(var64 + 1e-5), **TOL32)


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.channels_last_3d])
def test_forward_train_channels_last(fmt):
    shape = (2, 3, 4, 5) if fmt is torch.channels_last else (2, 3, 3, 4, 5)
    x = torch.randn(shape)
    w, b = torch.randn(3), torch.randn(3)
    y, _, _ = reference.forward_train(x.to(memory_format=fmt), w, b, 1e-5)
    assert y.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(y, reference.forward_train(x, w, b, 1e-5)[0])


def test_forward_train_large_mean_is_accurate():
    # the one-pass formula E[x^2] - E[x]^2 fails here in float32; two passes do not
    x = 1e4 + torch.randn(16, 4, 8, 8)
    y, mean, invstd = reference.forward_train(x, None, None, 1e-5)
    y64, _, var64 = bn64(x)
    assert (y.double() - y64).abs().max() < 5e-3
    torch.testing.assert_close(invstd.double(), torch.rsqrt(var64 + 1e-5), rtol=1e-3, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_eval_matches_float64(shape):
    c = shape[1]
    x = torch.randn(shape)
    rm, rv, w, b = torch.randn(c), torch.rand(c) + 0.5, torch.randn(c), torch.randn(c)
    y = reference.forward_eval(x, rm, rv, w, b, 1e-5)
    expected = (x.double() - channel(rm, x.dim())) / torch.sqrt(channel(rv, x.dim()) + 1e-5)
    expected = expected * channel(w, x.dim()) + channel(b, x.dim())
    torch.testing.assert_close(y.double(), expected, **TOL32)


# --- reference backward and the autograd Function -------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_backward_matches_autograd_of_float64_forward(shape, affine):
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c, dtype=torch.float64, requires_grad=True) if affine else None
    b = torch.randn(c, dtype=torch.float64, requires_grad=True) if affine else None
    y64, _, _ = bn64(x, w, b)
    dy = torch.randn_like(y64)
    expected = torch.autograd.grad(y64, [t for t in (x, w, b) if t is not None], dy)

    _, mean, invstd = reference.forward_train(x.detach(), w, b, 1e-5)
    dx, dw, db = reference.backward(dy, x.detach(), w, mean, invstd)
    torch.testing.assert_close(dx, expected[0])
    if affine:
        torch.testing.assert_close(dw, expected[1])
        torch.testing.assert_close(db, expected[2])
    else:
        # without a weight, dweight is still sum(dy * xhat): what a weight of ones would get
        xhat = (x.detach() - channel(mean, x.dim())) * channel(invstd, x.dim())
        torch.testing.assert_close(dw, (dy * xhat).sum(dims_but_1(x)))


# --- every CPU backend, through the functional, against torch ---------------------------------

BACKENDS = ["reference", "cpu"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("momentum", [0.1, 1.0, 0.5])
@pytest.mark.parametrize("params", ["both", "weight_only", "none"])
def test_functional_training_matches_torch(backend, shape, momentum, params):
    c = shape[1]
    w = torch.randn(c) if params != "none" else None
    b = torch.randn(c) if params == "both" else None
    ours_stats = [torch.randn(c), torch.rand(c) + 0.5]
    torch_stats = [s.clone() for s in ours_stats]
    for _ in range(3):
        x, dy = torch.randn(shape) * 2 + 1, torch.randn(shape)
        results = []
        for fn, (rm, rv) in (
            (lambda *a: batch_norm(*a, backend=backend), ours_stats),
            (F.batch_norm, torch_stats),
        ):
            xs, ws, bs = (None if t is None else t.clone().requires_grad_(True) for t in (x, w, b))
            y = fn(xs, rm, rv, ws, bs, True, momentum, 1e-5)
            leaves = [t for t in (xs, ws, bs) if t is not None]
            results.append((y, torch.autograd.grad(y, leaves, dy)))
        (y, grads), (yt, grads_t) = results
        torch.testing.assert_close(y, yt, **TOL32)
        torch.testing.assert_close(grads, grads_t, **TOL32)
        torch.testing.assert_close(ours_stats, torch_stats, **TOL32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [None, 0.3])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_tracked_training_matches_torch_module(backend, momentum, layout):
    # batch_norm_tracked is nn.BatchNorm2d's training forward: counter, cumulative
    # average for momentum=None, gradients; transposed input is copied once (autograd too)
    theirs = torch.nn.BatchNorm2d(3, momentum=momentum)
    stats = [theirs.running_mean.clone(), theirs.running_var.clone()]
    counter = theirs.num_batches_tracked.clone()
    w, b = torch.randn(3), torch.randn(3)
    with torch.no_grad():
        theirs.weight.copy_(w)
        theirs.bias.copy_(b)
    for _ in range(3):
        x, dy = torch.randn(4, 3, 5, 6) * 2 + 1, torch.randn(4, 3, 6, 5)
        if layout == "transposed":
            x = x.transpose(2, 3)
        else:
            dy = dy.transpose(2, 3).contiguous()
        xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
        y = batch_norm_tracked(xs, *stats, counter, ws, bs, momentum, 1e-5, backend)
        xt = x.clone().requires_grad_(True)
        theirs.weight.grad = theirs.bias.grad = None
        yt = theirs(xt)
        torch.testing.assert_close(y, yt, **TOL32)
        grads = torch.autograd.grad(y, (xs, ws, bs), dy)
        yt.backward(dy)
        torch.testing.assert_close(grads, (xt.grad, theirs.weight.grad, theirs.bias.grad), **TOL32)
        torch.testing.assert_close(stats, [theirs.running_mean, theirs.running_var], **TOL32)
        assert int(counter) == int(theirs.num_batches_tracked)


LAYOUTS = {
    "channels_last": lambda x: x.to(memory_format=torch.channels_last),
    "channels_last_3d": lambda x: x.unsqueeze(2).to(memory_format=torch.channels_last_3d),
    "transposed": lambda x: x.transpose(2, 3),
    "sliced": lambda x: x[:, :, ::2],
    "rows_2d": lambda x: x.flatten(2).mean(2),
    "single_pixel": lambda x: x[:, :, :1, :1],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_match_torch(backend, layout):
    base = torch.randn(6, 5, 4, 6) * 3 - 1
    x = LAYOUTS[layout](base).detach().requires_grad_(True)
    xt = x.detach().clone().requires_grad_(True)
    c = x.shape[1]
    w, b = torch.randn(c, requires_grad=True), torch.randn(c, requires_grad=True)
    wt, bt = w.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    rm, rv = torch.zeros(c), torch.ones(c)
    rmt, rvt = rm.clone(), rv.clone()
    y = batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, backend=backend)
    yt = F.batch_norm(xt, rmt, rvt, wt, bt, True, 0.1, 1e-5)
    dy = torch.randn_like(yt).transpose(0, 1).contiguous().transpose(0, 1)  # another layout
    y.backward(dy)
    yt.backward(dy)
    torch.testing.assert_close(y, yt, **TOL32)
    for ours, theirs in (
        (x.grad, xt.grad),
        (w.grad, wt.grad),
        (b.grad, bt.grad),
        (rm, rmt),
        (rv, rvt),
    ):
        torch.testing.assert_close(ours, theirs, **TOL32)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_matches_torch_closely(backend):
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    xt = x.detach().clone().requires_grad_(True)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    y = batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5, backend=backend)
    yt = F.batch_norm(xt, rm.clone(), rv.clone(), None, None, True, 0.1, 1e-5)
    assert y.dtype == torch.float64
    dy = torch.randn_like(y)
    y.backward(dy)
    yt.backward(dy)
    torch.testing.assert_close(y, yt, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, xt.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(backend, dtype):
    x = (torch.randn(8, 3, 4, 4) * 2 + 5).to(dtype).requires_grad_(True)
    w = torch.randn(3, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    y, mean, invstd = batch_norm_train(x, w, None, 1e-5, backend=backend)
    assert y.dtype == dtype and mean.dtype == invstd.dtype == torch.float32
    y64, mean64, _ = bn64(x.detach(), w.detach())
    torch.testing.assert_close(y.double(), y64, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-5)
    y.float().sum().backward()
    assert x.grad.dtype == dtype and w.grad.dtype == torch.float32
    batch_norm(x.detach(), rm, rv, None, None, True, 0.1, 1e-5, backend=backend)
    assert rm.dtype == torch.float32 and torch.isfinite(rv).all()


def cpu_training_matches_float64(x: torch.Tensor) -> torch.Tensor:
    """Trains ``x`` on the CPU kernel with a random weight, bias and ``dy`` of x's dtype and
    layout; asserts y, the batch mean and every gradient against float64. Returns y."""
    channels, dtype = x.shape[1], x.dtype
    x = x.detach().requires_grad_(True)
    w = torch.randn(channels, dtype=dtype, requires_grad=True)
    b = torch.randn(channels, dtype=dtype, requires_grad=True)
    y, mean, _ = batch_norm_train(x, w, b, 1e-5, backend="cpu")
    dy = torch.randn(y.shape).to(dtype).to(memory_format=reference.memory_format(x))
    y64, mean64, _ = bn64(x.detach(), w.detach(), b.detach())
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, w, b)]
    expected = torch.autograd.grad(bn64(*leaves64)[0], leaves64, dy.double())
    grads = torch.autograd.grad(y, (x, w, b), dy)
    low = dtype in (torch.float16, torch.bfloat16)
    tol = {"rtol": 1e-2, "atol": 3e-2} if low else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(y.double(), y64, **tol)
    torch.testing.assert_close(mean.double(), mean64, **tol)
    for ours, theirs in zip(grads, expected, strict=True):
        torch.testing.assert_close(ours.double(), theirs, **tol)
    return y


# Planes of 3, 49, 63, 65, 99 and 256 values: the CPU kernel sums a plane in vectors of 16
# floats (8 doubles) with AVX-512, 8 (4) with AVX2, four at a time, then the one to three
# vectors left, then the values left as one more vector that ends where the plane ends (its
# lanes already summed masked off; it writes the outputs of those lanes again); a plane
# shorter than a vector, element by element.
# In both orders the kernels read channels-first tensors in (see "the planes layout's order"
# in batchnorm_cpu.cpp): tasks owning blocks of channels, or runs of whole samples.
@pytest.mark.parametrize("spatial", [(1, 3), (7, 7), (7, 9), (5, 13), (9, 11), (16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("order", ["channels", "samples"])
def test_every_plane_size_matches_float64(monkeypatch, spatial, dtype, order):
    monkeypatch.setenv(ORDER_ENV, order)
    base = torch.randn(3, 2, *spatial, dtype=torch.float64) * 2 + 3
    cpu_training_matches_float64(base.to(dtype))


ORDER_ENV = "NORMBENCH_KERNEL_PLANE_ORDER"
STREAM_ENV = "NORMBENCH_KERNEL_STREAM_BYTES"
NEVER = str(1 << 62)  # a threshold above any output: plain stores


def cpu_outputs(x: torch.Tensor, relu: bool) -> list[torch.Tensor]:
    """Every output the CPU kernel writes for ``x``: the training forward's y, mean and
    invstd, the backward's three gradients, the eval's y."""
    channels = x.shape[1]
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(channels, generator=gen, dtype=torch.float64).to(x.dtype)
    b = torch.randn(channels, generator=gen, dtype=torch.float64).to(x.dtype)
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)
    nb = ops.library()
    y, mean, invstd = nb.batch_norm_forward(x, w, b, 1e-5, relu)
    grads = nb.batch_norm_backward(dy, x, w, b, mean, invstd, relu)
    rv = torch.rand(channels, generator=gen).to(x.dtype) + 0.5  # of x's dtype, as torch asks
    y_eval = nb.batch_norm_eval(x, mean.to(x.dtype), rv, w, b, 1e-5, relu)
    return [y, mean, invstd, *grads, y_eval]


def assert_streaming_changes_no_output(monkeypatch, x: torch.Tensor, relu: bool) -> None:
    """Every output for ``x`` with streaming stores for all that can take them is the one
    with plain stores, bit for bit."""
    monkeypatch.setenv(STREAM_ENV, NEVER)
    stored = cpu_outputs(x, relu)
    monkeypatch.setenv(STREAM_ENV, "0")
    streamed = cpu_outputs(x, relu)
    for ours, theirs in zip(streamed, stored, strict=True):
        assert torch.equal(ours, theirs)


# Outputs at least NORMBENCH_KERNEL_STREAM_BYTES large are written with streaming stores
# where their planes are whole aligned cache lines (4x4 floats, 4x4 and 8x8 doubles); the
# others (3x3, 7x7, channels_last) keep plain stores. Either way the same values, bit for bit.
@pytest.mark.parametrize("spatial", [(4, 4), (8, 8), (3, 3), (7, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_streamed_outputs_are_bit_identical_to_stored_ones(monkeypatch, spatial, dtype, relu, fmt):
    x = (torch.randn(5, 6, *spatial, dtype=torch.float64) * 2 + 3).to(dtype)
    assert_streaming_changes_no_output(monkeypatch, x.contiguous(memory_format=fmt), relu)


@pytest.mark.parametrize("relu", [False, True])
def test_streamed_outputs_of_channels_split_across_threads_are_bit_identical(monkeypatch, relu):
    # one channel of 64 x 32x32 values: its samples are split across the threads' tasks
    assert_streaming_changes_no_output(monkeypatch, torch.randn(64, 1, 32, 32) * 2 + 3, relu)


@pytest.mark.parametrize("relu", [False, True])
def test_streamed_outputs_in_the_samples_order_are_bit_identical(monkeypatch, relu):
    # 4 threads, each task a run of 16 samples (writing its part of every channel)
    monkeypatch.setenv(ORDER_ENV, "samples")
    with threads(4):
        assert_streaming_changes_no_output(monkeypatch, torch.randn(64, 8, 16, 16) * 2 + 3, relu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streamed_outputs_match_float64(monkeypatch, dtype):
    monkeypatch.setenv(STREAM_ENV, "0")
    cpu_training_matches_float64((torch.randn(6, 4, 8, 8, dtype=torch.float64) * 2 + 3).to(dtype))


@contextlib.contextmanager
def threads(count: int):
    """torch's intra-op threads set to ``count`` (on any machine: they may share cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# The samples order splits the samples across tasks (at most one per thread, each with
# at least 32768 values) and adds their per-channel sums up after the pass.
@pytest.mark.parametrize(
    "shape",
    [
        (64, 8, 16, 16),  # 4 tasks of 16 samples
        (3, 8, 64, 64),  # fewer samples than threads: 3 tasks of 1
        (7, 3, 9, 11),  # one task, planes that end mid-vector
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_samples_order_split_across_tasks_matches_float64(monkeypatch, shape, dtype):
    monkeypatch.setenv(ORDER_ENV, "samples")
    with threads(4):
        cpu_training_matches_float64((torch.randn(shape, dtype=torch.float64) * 2 + 3).to(dtype))


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_both_orders_give_the_same_outputs(monkeypatch, relu, dtype):
    # every output: the forward's, the backward's and the eval's; the sums' order differs
    x = (torch.randn(64, 8, 16, 16, dtype=torch.float64) * 2 + 3).to(dtype)
    outputs = {}
    with threads(4):
        for order in ("channels", "samples"):
            monkeypatch.setenv(ORDER_ENV, order)
            outputs[order] = cpu_outputs(x, relu)
    tol = TOL32 if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    for ours, theirs in zip(outputs["samples"], outputs["channels"], strict=True):
        torch.testing.assert_close(ours, theirs, **tol)


def documented_order(shape, backward: bool, threads: int, l2: int, llc: int) -> str:
    """The order "the planes layout's order" in batchnorm_cpu.cpp documents for a float32
    tensor of ``shape`` (at most 128 channels: their partial sums fit its L1 bound)."""
    n, c, length = shape[0], shape[1], math.prod(shape[2:])
    inputs = 2 if backward else 1
    in_bytes = n * c * length * 4 * inputs
    per_block = max(1, min(max(1, 2048 // (length * 4)), c // threads))  # block_channels
    block_bytes = n * per_block * length * 4 * inputs  # the channels order's second pass
    fits = in_bytes <= llc // 2 or block_bytes > l2 // 2
    return "samples" if in_bytes > l2 and fits and n >= threads else "channels"


def test_the_plane_order_follows_the_caches(monkeypatch):
    from normbench.bench import cpu_cache_bytes

    monkeypatch.delenv(ORDER_ENV, raising=False)
    nb = ops.library()
    l2, llc = cpu_cache_bytes(2), cpu_cache_bytes()
    with threads(2):
        assert nb.plane_order(torch.empty(2, 4, 8, 8)) == "channels"  # within any L2
        channels_last = torch.empty(4, 4, 8, 8).to(memory_format=torch.channels_last)
        assert nb.plane_order(channels_last) == "rows"
    if not (l2 and llc and l2 < llc // 4):
        pytest.skip(f"this CPU's L2 ({l2}) and last-level cache ({llc}) are not both listed")
    # samples of 64 KiB and 4 KiB planes (blocks of one channel: the channels order's
    # blocks grow with the batch), and of 64 KiB in 1 KiB planes (blocks of two)
    shapes = []
    for per_sample, spatial in ((64 << 10, (32, 32)), (64 << 10, (16, 16))):
        channels = per_sample // (4 * math.prod(spatial))
        for bound in (l2, llc // 4, llc // 2, llc, 4 * l2, 16 * l2, 64 * l2):
            for n in (bound // per_sample - 1, bound // per_sample, bound // per_sample + 1):
                if n >= 1:
                    shapes.append((n, channels, *spatial))
    # with more threads than a batch just above the L2 has samples, one would idle
    for count in (1, 2, 4, l2 // (64 << 10) + 2):
        with threads(count):
            for shape in shapes:
                for backward in (False, True):
                    expected = documented_order(shape, backward, count, l2, llc)
                    assert nb.plane_order(torch.empty(shape), backward) == expected, (
                        shape,
                        backward,
                        count,
                    )
    orders = {documented_order(s, b, 2, l2, llc) for s in shapes for b in (False, True)}
    assert orders == {"channels", "samples"}  # the shapes straddle the bounds
    just_above = (l2 // (64 << 10) + 1, 16, 32, 32)
    assert documented_order(just_above, False, 2, l2, llc) == "samples"
    assert documented_order(just_above, False, just_above[0] + 1, l2, llc) == "channels"


@pytest.mark.parametrize("order", ["channels", "samples"])
def test_the_plane_order_comes_from_the_environment(monkeypatch, order):
    monkeypatch.setenv(ORDER_ENV, order)
    nb = ops.library()
    for shape in [(2, 4, 8, 8), (64, 64, 16, 16), (1, 3, 5)]:
        assert nb.plane_order(torch.empty(shape)) == order
        assert nb.plane_order(torch.empty(shape), True) == order
    assert nb.plane_order(torch.empty(4, 3)) == "rows"


def test_a_bad_plane_order_is_refused(monkeypatch):
    monkeypatch.setenv(ORDER_ENV, "diagonal")
    with pytest.raises(RuntimeError, match=f"{ORDER_ENV}=diagonal: valid are auto, channels"):
        batch_norm_train(torch.randn(4, 3, 4, 4), None, None, 1e-5, backend="cpu")


def test_the_default_stream_threshold_is_a_quarter_of_the_last_level_cache(monkeypatch):
    from normbench.bench import largest_cache_bytes

    monkeypatch.delenv(STREAM_ENV, raising=False)
    cache = largest_cache_bytes("cpu")  # the largest cache Linux lists, from sysfs
    assert ops.library().stream_threshold() == (cache // 4 if cache else 8 << 20)


def test_the_stream_threshold_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(STREAM_ENV, "12345")
    assert ops.library().stream_threshold() == 12345


@pytest.mark.parametrize("value", ["lots", "-1", "12kB", ""])
def test_a_bad_stream_threshold_is_refused(monkeypatch, value):
    monkeypatch.setenv(STREAM_ENV, value)
    x = torch.randn(4, 3, 4, 4)
    with pytest.raises(RuntimeError, match=f"{STREAM_ENV}={value}: expected a whole number"):
        batch_norm_train(x, None, None, 1e-5, backend="cpu")


POOL_ENV = "NORMBENCH_KERNEL_POOL_BYTES"
POOLED = (4, 16, 32, 32)  # 256 KiB of float32: large enough for the pool (64 KiB and more)


def forward_output(x: torch.Tensor) -> torch.Tensor:
    return ops.library().batch_norm_forward(x, None, None, 1e-5, False)[0]


def test_a_freed_output_is_reused_by_the_next_of_its_size(monkeypatch):
    monkeypatch.setenv(POOL_ENV, str(1 << 30))
    nb = ops.library()
    x = torch.randn(POOLED)
    y = forward_output(x)
    address, before = y.data_ptr(), nb.pool_bytes()
    del y
    assert nb.pool_bytes() == before + x.numel() * 4
    again = forward_output(x)
    assert again.data_ptr() == address
    assert nb.pool_bytes() == before
    assert again.data_ptr() % 64 == 0  # as torch's allocator: aligned for streaming stores
    assert again.untyped_storage().resizable()  # an ordinary tensor: it can grow
    again.resize_(2, *POOLED)
    assert again.shape == (2, *POOLED)


def test_the_pool_keeps_at_most_its_limit_dropping_the_oldest(monkeypatch):
    nbytes = math.prod(POOLED) * 4
    monkeypatch.setenv(POOL_ENV, str(nbytes * 3 // 2))
    nb = ops.library()
    assert nb.pool_limit() == nbytes * 3 // 2
    x = torch.randn(POOLED)
    older, newer = forward_output(x), forward_output(x)
    address = newer.data_ptr()
    del older, newer
    assert nb.pool_bytes() == nbytes  # the older block (and any kept before) dropped
    assert forward_output(x).data_ptr() == address


def test_emptying_the_pool_frees_every_kept_block(monkeypatch):
    monkeypatch.setenv(POOL_ENV, str(1 << 30))
    nb = ops.library()
    held = [forward_output(torch.randn(POOLED)) for _ in range(3)]
    del held
    kept = nb.pool_bytes()
    assert kept >= 3 * math.prod(POOLED) * 4
    assert nb.empty_pool() == kept
    assert nb.pool_bytes() == 0
    assert nb.empty_pool() == 0


def test_a_pool_limit_of_zero_keeps_no_output(monkeypatch):
    monkeypatch.setenv(POOL_ENV, "0")
    nb = ops.library()
    before = nb.pool_bytes()
    y = forward_output(torch.randn(POOLED))
    del y
    assert nb.pool_bytes() == before


def test_the_default_pool_limit_is_a_sixteenth_of_memory_at_most_a_gibibyte(monkeypatch):
    monkeypatch.delenv(POOL_ENV, raising=False)
    memory = os.sysconf("SC_PHYS_PAGES") // 16 * os.sysconf("SC_PAGE_SIZE")
    assert ops.library().pool_limit() == min(memory, 1 << 30)


def test_threads_sharing_the_pool_get_correct_outputs_and_keep_its_limit(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    nbytes = math.prod(POOLED) * 4
    monkeypatch.setenv(POOL_ENV, str(5 * nbytes))
    x = torch.randn(POOLED)
    expected = {n: forward_output(x[:n]).clone() for n in (len(x), 2)}

    def churn(seed: int) -> bool:
        # outputs of two sizes, freed in varying order while the other threads do the same
        gen = torch.Generator().manual_seed(seed)
        held = []
        for _ in range(40):
            held.append(forward_output(x))
            held.append(forward_output(x[:2]))
            if torch.rand((), generator=gen) < 0.5:
                held.pop(0)
            if len(held) > 6:
                held = held[3:]
        return all(torch.equal(y, expected[len(y)]) for y in held)

    with ThreadPoolExecutor(4) as threads:
        assert all(threads.map(churn, range(4)))
    assert ops.library().pool_bytes() <= 5 * nbytes


@pytest.mark.parametrize("value", ["lots", "-1", "1GiB", ""])
def test_a_bad_pool_limit_is_refused(monkeypatch, value):
    monkeypatch.setenv(POOL_ENV, value)
    with pytest.raises(RuntimeError, match=f"{POOL_ENV}={value}: expected a whole number"):
        forward_output(torch.randn(POOLED))


# Outputs written into reused blocks, which still hold an earlier output's values (NaN here):
# every element is written, so the outputs are those written into fresh memory, bit for bit.
CF, CL = torch.contiguous_format, torch.channels_last
REUSED = [((4, 16, 32, 32), CF), ((4, 16, 32, 32), CL), ((48, 16, 7, 7), CF), ((48, 16, 7, 7), CL),
          ((64, 1, 32, 32), CF), ((4, 4096, 3), CF), ((1024, 40), CF)]  # fmt: skip


@pytest.mark.parametrize(("shape", "fmt"), REUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
def test_outputs_in_reused_blocks_are_bit_identical(monkeypatch, shape, fmt, dtype, relu):
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 3).to(dtype).contiguous(memory_format=fmt)
    monkeypatch.setenv(POOL_ENV, "0")
    fresh = cpu_outputs(x, relu)
    monkeypatch.setenv(POOL_ENV, str(1 << 30))
    nb = ops.library()
    # three blocks of x's size hold NaN: the forward's y, the backward's dx, the eval's y
    garbage = [forward_output(x) for _ in range(3)]
    for block in garbage:
        block.fill_(math.nan)
    before = nb.pool_bytes()
    del garbage, block
    assert nb.pool_bytes() == before + 3 * x.numel() * x.element_size()
    reused = cpu_outputs(x, relu)
    assert nb.pool_bytes() == before  # the three outputs took the three blocks
    for ours, theirs in zip(reused, fresh, strict=True):
        assert torch.equal(ours, theirs)


# channels_last rows of 5, 20 and 35 channels: vectors of 16 channels, then the rest.
@pytest.mark.parametrize("channels", [5, 20, 35])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_every_row_width_matches_float64(channels, dtype):
    base = torch.randn(4, channels, 3, 5, dtype=torch.float64) * 2 + 3
    y = cpu_training_matches_float64(base.to(dtype).to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_half_precision_outputs_are_rounded_as_torch_rounds(dtype, fmt):
    # Eval with mean 0, variance 1, eps 0 and no bias computes y = x * w in float32: one
    # product, so the CPU kernel's y must be torch's own float32 -> dtype rounding of it,
    # bit for bit, infinities and NaN included (the kernel converts 16 values at a time).
    x = torch.randn(3, 20, 5, 7) * 100
    x[0, 0, 0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0])
    x = x.to(dtype).to(memory_format=fmt)
    w = torch.rand(20) + 0.5
    y = batch_norm(x, torch.zeros(20), torch.ones(20), w, None, False, 0.1, 0.0, backend="cpu")
    expected = (x.float() * w.reshape(1, -1, 1, 1)).to(dtype)
    assert torch.equal(y.float().nan_to_num(7.0), expected.float().nan_to_num(7.0))
    assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_matches_torch(backend):
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    xt = x.detach().clone().requires_grad_(True)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    w = torch.randn(3, requires_grad=True)
    wt = w.detach().clone().requires_grad_(True)
    b = torch.randn(3)
    y = batch_norm(x, rm, rv, w, b, False, 0.1, 1e-3, backend=backend)
    yt = F.batch_norm(xt, rm, rv, wt, b, False, 0.1, 1e-3)
    torch.testing.assert_close(y, yt)
    dy = torch.randn_like(y)
    y.backward(dy)
    yt.backward(dy)
    torch.testing.assert_close(x.grad, xt.grad)
    torch.testing.assert_close(w.grad, wt.grad)
    with torch.no_grad():  # the no-autograd eval pass
        torch.testing.assert_close(
            batch_norm(x, rm, rv, w, b, False, 0.1, 1e-3, backend=backend), yt
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_is_accurate(backend):
    # the one-pass formula E[x^2] - E[x]^2 fails here in float32; normbench's do not
    x = 1e4 + torch.randn(16, 4, 8, 8)
    x_cl = x.to(memory_format=torch.channels_last)
    for data in (x, x_cl, x.flatten(2).transpose(1, 2).reshape(-1, 4)):
        y, _, invstd = batch_norm_train(data, None, None, 1e-5, backend=backend)
        y64, _, var64 = bn64(data)
        assert (y.double() - y64).abs().max() < 5e-3
        torch.testing.assert_close(invstd.double(), torch.rsqrt(var64 + 1e-5), rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_variance_channel_is_finite(backend):
    x = torch.randn(4, 3, 5, 5)
    x[:, 1] = 7.0
    x.requires_grad_(True)
    y, _, _ = batch_norm_train(x, torch.ones(3), torch.zeros(3), 1e-5, backend=backend)
    y.backward(torch.randn_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert y[:, 1].abs().max() < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(3, 2), (3, 2, 2, 2)])
def test_gradcheck(backend, affine, shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    params = [torch.randn(2, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    w, b = params if affine else (None, None)

    def fn(x, w, b):
        return batch_norm_train(x, w, b, 1e-5, backend=backend)[0]

    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_come_back_without_grad(backend):
    x = torch.randn(4, 3, requires_grad=True)
    y, mean, invstd = batch_norm_train(x, None, None, 1e-5, backend=backend)
    assert y.requires_grad and not mean.requires_grad and not invstd.requires_grad


def test_double_backward_is_refused_by_the_kernel():
    # The kernel's backward is not itself differentiable: an error, not wrong numbers.
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    y = batch_norm(x, None, None, training=True, backend="cpu")
    with pytest.raises(RuntimeError, match="does not support double backward"):
        (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        g.sum().backward()


def test_the_reference_is_plain_torch_operations_and_twice_differentiable():
    """The specification runs on autograd's own derivatives, second ones included."""
    x = (torch.randn(4, 3, 2, 2, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def ours(x, w):
        return batch_norm(x, None, None, w, None, True, 0.1, 1e-5, backend="reference")

    assert torch.autograd.gradgradcheck(ours, (x, w))
    (g,) = torch.autograd.grad(ours(x, w).pow(2).sum(), x, create_graph=True)
    (gt,) = torch.autograd.grad(
        F.batch_norm(x, None, None, w, None, True, 0.1, 1e-5).pow(2).sum(), x, create_graph=True
    )
    torch.testing.assert_close(g, gt)


# --- the operators -----------------------------------------------------------------------------


def opcheck_every_operator(x, relu):
    """torch.library.opcheck (schema, fake, autograd registration, aot dispatch) on each
    operator, with and without the optional arguments."""
    nb = ops.library()
    w = torch.randn(3, device=x.device, requires_grad=True)
    b = torch.randn(3, device=x.device, requires_grad=True)
    xg = x.clone().requires_grad_(True)
    _, mean, invstd = reference.forward_train(x, w.detach(), b.detach(), 1e-5)
    dy = torch.randn_like(x)
    checks = [
        (nb.batch_norm_forward, (xg, w, b, 1e-5, relu)),
        (nb.batch_norm_forward, (xg, None, None, 1e-5, relu)),
        # a weight and bias of shape (1, C), which torch takes too
        (
            nb.batch_norm_forward,
            (xg, w.detach()[None].requires_grad_(), b.detach()[None], 1e-5, relu),
        ),
        (nb.batch_norm_backward, (dy, x, w.detach(), b.detach(), mean, invstd, relu)),
        (nb.batch_norm_backward, (dy, x, None, None, mean, invstd, relu)),
        (nb.batch_norm_eval, (xg, mean, invstd, w, b, 1e-5, relu)),
        (
            nb.batch_norm_eval,
            (xg, mean, invstd, None, b.detach()[None].requires_grad_(), 1e-5, relu),
        ),
        (nb.batch_norm_stats, (x, 1e-5)),
        # the backward's two halves (synchronized BatchNorm)
        (nb.batch_norm_backward_reduce, (dy, x, w.detach(), b.detach(), mean, invstd, relu)),
        (nb.batch_norm_backward_reduce, (dy, x, None, None, mean, invstd, relu)),
        (
            nb.batch_norm_backward_apply,
            (dy, x, w.detach(), b.detach(), mean, invstd, mean, invstd, 300, relu),
        ),
        (
            nb.update_running_stats,
            (torch.zeros(3, device=x.device), torch.ones(3, device=x.device), mean, invstd)
            + (0.1, 1e-5, 100),
        ),
        (  # the batch counter incremented in the same call; a cumulative average
            nb.update_running_stats,
            (torch.zeros(3, device=x.device), torch.ones(3, device=x.device), mean, invstd)
            + (0.1, 1e-5, 100, torch.zeros((), dtype=torch.long, device=x.device), True),
        ),
    ]
    # synchronized BatchNorm's statistics: the local row, the merge
    checks.append((nb.batch_norm_stats_table, (x, 3, 1)))
    table = nb.batch_norm_stats_table(x, 2, 0) + nb.batch_norm_stats_table(x[:2], 2, 1)
    checks.append((nb.batch_norm_merge_stats, (table, 1e-5, torch.float32)))
    for op, args in checks:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout, relu):
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    opcheck_every_operator(x, relu)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_synced_statistics_are_the_whole_batchs(backend, dtype):
    """Parts of a batch (uneven, one empty), each in its own row of the statistics' table,
    the tables summed and merged: the whole batch's mean and biased variance (float64 math
    on the same values; a mean of 1e4 against a spread of 1 too), its count, and invstd
    with eps; float64 to 1e-12, float32 and bfloat16 input (float32 statistics) to
    float32's precision."""
    g = torch.Generator().manual_seed(3)
    whole = (torch.randn(11, 4, 3, 2, generator=g, dtype=torch.float64) + 1e4).to(dtype)
    whole = whole.contiguous(memory_format=torch.channels_last)
    pieces = [whole[:5], whole[5:5], whole[5:11]]
    table = sum(ops.statistics_table(p, len(pieces), i, backend) for i, p in enumerate(pieces))
    assert table.dtype == torch.float64 and table.shape == (3, 9)
    acc = reference.accumulation_dtype(dtype)
    mean, var, invstd, count = ops.merge_statistics(table, 1e-5, acc, backend)
    assert int(count) == 11 * 3 * 2 and count.dtype == torch.long
    assert mean.dtype == var.dtype == invstd.dtype == acc
    x = whole.double()
    want_var, want_mean = torch.var_mean(x, dim=[0, 2, 3], unbiased=False)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(mean.double(), want_mean, rtol=tol, atol=0)
    torch.testing.assert_close(var.double(), want_var, rtol=30 * tol, atol=0)
    torch.testing.assert_close(invstd.double(), (want_var + 1e-5).rsqrt(), rtol=30 * tol, atol=0)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_synced_statistics_of_no_values_and_refusals(backend):
    """A table with no values merges into NaN statistics and a count of 0; a part outside
    the table, a table not (parts, 1 + 2C) of float64, and statistics of a dtype other than
    float32/float64 are refused, with the same message by the operator and its Python
    checks (the fakes')."""
    x = torch.randn(0, 3, 2)
    table = ops.statistics_table(x, 2, 1, backend)
    assert torch.equal(table, torch.zeros(2, 7, dtype=torch.float64))
    mean, var, invstd, count = ops.merge_statistics(table, 1e-5, torch.float32, backend)
    assert int(count) == 0 and mean.isnan().all() and var.isnan().all() and invstd.isnan().all()
    refused = [
        (ops.statistics_table, (torch.randn(4, 3), 2, 2), "got part 2 of 2"),
        (ops.statistics_table, (torch.randn(4, 3), 0, 0), "got part 0 of 0"),
        (ops.merge_statistics, (torch.zeros(2, 6, dtype=torch.float64), 1e-5, torch.float32),
         "table must be (parts, 1 + 2C)"),
        (ops.merge_statistics, (torch.zeros(2, 7), 1e-5, torch.float32), "found Float"),
        (ops.merge_statistics, (torch.zeros(2, 7, dtype=torch.float64), 1e-5, torch.float16),
         "must be Float or Double"),
    ]  # fmt: skip
    for fn, args, message in refused:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            fn(*args, backend)
        meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(RuntimeError, match=re.escape(message)):
            fn(*meta, "cpu")  # the fake


@pytest.mark.parametrize(
    ("backend", "compiler", "relu"),
    [
        ("reference", "aot_eager", False),
        ("cpu", "aot_eager", False),
        ("cpu", "aot_eager", True),
        ("cpu", "inductor", False),
        ("cpu", "inductor", True),
    ],
)
def test_module_works_under_torch_compile(backend, compiler, relu):
    """The layer (and the fused norm and ReLU) compiled with fullgraph: outputs,
    gradients and running statistics as in eager mode."""
    from normbench.norms import BatchNorm2d

    torch.manual_seed(0)
    eager = BatchNorm2d(3, backend=backend, relu=relu)
    compiled_module = BatchNorm2d(3, backend=backend, relu=relu)
    compiled = torch.compile(compiled_module, backend=compiler, fullgraph=True)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5)
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ye, yc = eager(xe), compiled(xc)
        torch.testing.assert_close(yc, ye)
        dy = torch.randn_like(ye)
        ye.backward(dy)
        yc.backward(dy)
        torch.testing.assert_close(xc.grad, xe.grad)
        torch.testing.assert_close(compiled_module.weight.grad, eager.weight.grad)
    torch.testing.assert_close(compiled_module.running_mean, eager.running_mean)
    torch.testing.assert_close(compiled_module.running_var, eager.running_var)
    assert compiled_module.num_batches_tracked == eager.num_batches_tracked == 3
    assert compiled_module.num_batches_tracked == eager.num_batches_tracked == 3


# --- backend choice and the fallback -----------------------------------------------------------


def test_auto_picks_the_compiled_kernel_on_the_cpu():
    assert cpu.extension() is not None, cpu.failure()
    assert ops.resolve_backend("auto", torch.zeros(2, 2)) == "cpu"
    assert ops.resolve_backend("reference", torch.zeros(2, 2)) == "reference"


def test_unknown_or_unfit_backends_are_refused():
    with pytest.raises(ValueError, match="unknown norm backend 'gpu'"):
        ops.resolve_backend("gpu", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="norm backend 'triton' runs CUDA tensors, got a cpu"):
        ops.resolve_backend("triton", torch.zeros(2, 2))


def test_without_a_compiler_the_reference_runs_after_one_warning(monkeypatch):
    def no_compiler():
        raise RuntimeError("g++: command not found")

    monkeypatch.setattr(cpu, "_extension", None)
    monkeypatch.setattr(cpu, "_failure", None)
    monkeypatch.setattr(cpu, "_load", no_compiler)
    x = torch.randn(4, 3, 2, 2)
    with pytest.warns(
        RuntimeWarning, match="could not compile.*g\\+\\+: command not found"
    ) as seen:
        y = batch_norm(x, None, None, training=True)
        batch_norm(x, None, None, training=True, backend="cpu")
    assert len(seen) == 1
    assert ops.resolve_backend("auto", x) == ops.resolve_backend("cpu", x) == "reference"
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True), **TOL32)


def test_a_failed_registration_falls_back_as_a_failed_build(monkeypatch):
    # ops.library() registers the Python implementations after cpu.extension() has loaded
    # the C++ library: a failure there (a broken triton, say) is the library's, one warning
    def broken():
        raise RuntimeError("triton exploded")

    monkeypatch.setattr(cpu, "_extension", None)
    monkeypatch.setattr(cpu, "_failure", None)
    monkeypatch.setattr(cpu, "_load", lambda: None)  # the library is loaded already
    monkeypatch.setattr(ops, "_forward", None)  # as if its implementations were not registered
    monkeypatch.setattr(ops, "register_python_implementations", broken)
    with pytest.warns(RuntimeWarning, match="could not compile.*triton exploded") as seen:
        assert ops.library() is None
        assert ops.library() is None
    assert len(seen) == 1
    assert cpu.extension() is None and "triton exploded" in cpu.failure()
    assert ops.resolve_backend("auto", torch.zeros(2, 2)) == "reference"


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_one_value_per_channel_error_matches_torch(shape):
    x = torch.randn(shape)
    kind, message = torch_error(lambda: F.batch_norm(x, None, None, training=True))
    assert kind is ValueError
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        batch_norm(x, None, None, training=True)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        batch_norm_train(x, None, None, 1e-5)


def test_eps_and_eval_errors_match_torch():
    x = torch.randn(4, 3)
    for call, error in (
        (lambda fn: fn(x, None, None, training=True, eps=0.0), eps_error(0.0, True)),
        (
            lambda fn: fn(x, torch.zeros(3), torch.ones(3), training=False, eps=-1.0),
            eps_error(-1.0, False),
        ),
        (
            lambda fn: fn(x, None, None, training=False),
            (RuntimeError, "running_mean must be defined in evaluation mode"),
        ),
    ):
        kind, message = expected_error(lambda call=call: call(F.batch_norm), error)
        with pytest.raises(kind, match=f"^{re.escape(message)}$"):
            call(batch_norm)
    # eps = 0 in eval: allowed, as in torch 2.13 (the running variance, here 1, under the root)
    y = batch_norm(x, torch.zeros(3), torch.ones(3), training=False, eps=0.0)
    torch.testing.assert_close(y, x)


# --- the Triton backend through the operators (the interpreter here, CUDA where there is one) --


@pytest.fixture
def triton_backend():
    """The operators on the Triton kernels: on CUDA where there is one, else on CPU tensors
    through Triton's interpreter (the operators' CPU kernels swapped for the Triton ones)."""
    # triton ships with torch's Linux builds: a failure to import it here is a failure
    assert ops._triton() is not None, "triton did not import"
    if torch.cuda.is_available():
        yield "triton"
        return
    with ops.triton_on_cpu():
        yield "auto"


def test_triton_backend_matches_torch_through_the_functional(triton_backend):
    kw = {"dtype": torch.float64, "device": "cuda" if triton_backend == "triton" else "cpu"}
    x = (torch.randn(4, 3, 5, 5, **kw) * 2 + 1).requires_grad_(True)
    xt = x.detach().clone().requires_grad_(True)
    w = torch.randn(3, **kw, requires_grad=True)
    wt = w.detach().clone().requires_grad_(True)
    rm, rv = torch.zeros(3, **kw), torch.ones(3, **kw)
    rmt, rvt = rm.clone(), rv.clone()
    y = batch_norm(x, rm, rv, w, None, True, 0.1, 1e-5, backend=triton_backend)
    yt = F.batch_norm(xt, rmt, rvt, wt, None, True, 0.1, 1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    yt.backward(dy)
    for ours, theirs in ((y, yt), (x.grad, xt.grad), (w.grad, wt.grad), (rm, rmt), (rv, rvt)):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    ye = batch_norm(x, rm, rv, w, None, False, 0.1, 1e-5, backend=triton_backend)
    torch.testing.assert_close(ye, F.batch_norm(xt, rmt, rvt, wt, None, False, 0.1, 1e-5))


@pytest.mark.parametrize("relu", [False, True])
def test_triton_opcheck(triton_backend, relu):
    device = "cuda" if triton_backend == "triton" else "cpu"
    opcheck_every_operator((torch.randn(4, 3, 3, 3) * 2 + 1).to(device), relu)


@pytest.mark.parametrize("which", ["mean", "var"])
def test_one_running_statistic_without_the_other_is_refused_like_torch(which):
    x = torch.randn(6, 3, 4)
    args = (torch.zeros(3), None) if which == "mean" else (None, torch.ones(3))
    kind, message = expected_error(
        lambda: F.batch_norm(x, *args, training=True), ONE_RUNNING_STATISTIC
    )
    with pytest.raises(kind, match=f"^{re.escape(message)}$"):
        batch_norm(x, *args, training=True)


def test_the_eager_path_uses_no_private_torch_symbols():
    """One dispatch path: no torch._C shortcut around the dispatcher (and no private
    torch module) in the code a BatchNorm layer runs."""
    import ast
    from pathlib import Path

    import normbench

    root = Path(normbench.__file__).parent
    files = [
        root / "kernels" / "ops.py",
        root / "kernels" / "function.py",
        root / "kernels" / "cpu.py",
        *sorted((root / "norms").glob("*.py")),
    ]
    private = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch._"):
                private.append(f"{path.name}: from {node.module}")
            if isinstance(node, ast.Import):
                private += [f"{path.name}: import {a.name}" for a in node.names if "._" in a.name]
            if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(base, ast.Name) and base.id == "torch" and node.attr != "__version__":
                    private.append(f"{path.name}:{node.lineno}: torch...{node.attr}")
    assert private == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "2d"])
def test_the_statistics_alone_are_the_forwards(backend, layout):
    from normbench.kernels import batch_norm_stats

    x = torch.randn(16, 5, 6, 6) * 3 + 2
    x = {"channels_last": x.to(memory_format=torch.channels_last), "2d": x[:, :, 0, 0]}.get(
        layout, x
    )
    mean, invstd = batch_norm_stats(x, 1e-5, backend)
    _, fmean, finvstd = batch_norm_train(x, None, None, 1e-5, backend)
    assert torch.equal(mean, fmean) and torch.equal(invstd, finvstd)
    assert not mean.requires_grad


# --- every argument checked before a kernel reads it (issue 23; tests/test_kernel_fuzz.py
# draws thousands of such calls at random) ------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", [16, 4096])
def test_a_weight_and_bias_of_shape_1_c_are_read_as_torch_reads_them(backend, channels):
    """per_channel read a (1, C) weight by stride(0) = C: at 8x4096 the process died (exit
    139), at C = 16 the output was off by up to 8.5e30. torch takes any shape of C values."""
    x = torch.randn(8, channels, dtype=torch.float64)
    w = torch.randn(1, channels, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, channels, dtype=torch.float64, requires_grad=True)
    wt, bt = (t.detach().clone().requires_grad_() for t in (w, b))
    y = batch_norm(x, None, None, w, b, training=True, backend=backend)
    # torch's backward refuses the (1, C) bias its forward takes: it gets a (C,) view
    yt = F.batch_norm(x, None, None, wt.reshape(-1), bt.reshape(-1), training=True)
    torch.testing.assert_close(y, yt)
    dy = torch.randn_like(y)
    y.backward(dy)
    yt.backward(dy)
    assert w.grad.shape == b.grad.shape == (1, channels)  # each gradient of its tensor's shape
    torch.testing.assert_close(w.grad, wt.grad)
    torch.testing.assert_close(b.grad, bt.grad)
    stats = (torch.zeros(channels), torch.ones(channels))
    ye = batch_norm(x.float(), *stats, w.float(), b.float(), backend=backend)
    torch.testing.assert_close(ye, F.batch_norm(x.float(), *stats, wt.float(), bt.float()))


def test_a_batchnorm2d_whose_weight_is_1_c_matches_torch():
    """A BatchNorm2d whose weight was replaced by a (1, C) parameter gave NaN."""
    from normbench.norms import BatchNorm2d

    ours, theirs = BatchNorm2d(16).double(), torch.nn.BatchNorm2d(16).double()
    for module in (ours, theirs):
        module.weight = torch.nn.Parameter(torch.linspace(0.5, 2, 16, dtype=torch.float64)[None])
    x = torch.randn(4, 16, 5, 5, dtype=torch.float64)
    y = ours(x)
    torch.testing.assert_close(y, theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    y.sum().backward()
    assert ours.weight.grad.shape == (1, 16)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(1, 16), (16, 1), (1, 16, 1)])
def test_running_statistics_of_more_than_one_dimension_are_refused_as_torch_refuses(
    training, shape
):
    """Running statistics of shape (1, C) in eval killed the process; torch refuses them."""
    x = torch.randn(8, 16)
    kind, _ = torch_error(
        lambda: F.batch_norm(x, torch.zeros(shape), torch.ones(16), training=training)
    )
    assert kind is RuntimeError
    with pytest.raises(RuntimeError, match=r"^expected running_mean to have 1 dims but tensor has"):
        batch_norm(x, torch.zeros(shape), torch.ones(16), training=training)


def test_the_backward_operator_refuses_a_grad_out_not_of_the_inputs_shape():
    """A grad_out smaller than x, or of another channel count, was read out of bounds (a
    segfault); one of another shape but the same size was read as if it were x's."""
    nb = ops.library()
    x = torch.randn(8, 16, 4, 4)
    _, mean, invstd = nb.batch_norm_forward(x, None, None, 1e-5)
    for grad_out in (torch.randn(4, 16, 4, 4), torch.randn(8, 3, 4, 4), torch.randn(8, 16, 16)):
        with pytest.raises(RuntimeError, match=r"^grad_out should have the input's shape \[8, 16"):
            nb.batch_norm_backward(grad_out, x, None, None, mean, invstd)
    with pytest.raises(RuntimeError, match="^expected scalar type Float but found Double"):
        nb.batch_norm_backward(torch.randn(8, 16, 4, 4).double(), x, None, None, mean, invstd)
    with pytest.raises(RuntimeError, match="^mean should contain 16 elements not 3"):
        nb.batch_norm_backward(torch.randn_like(x), x, None, None, mean[:3], invstd)


def test_every_operator_refuses_a_per_channel_tensor_of_the_wrong_size():
    nb = ops.library()
    x, three, two = torch.randn(4, 3, 5), torch.ones(3), torch.ones(2)
    calls = {
        "weight": lambda: nb.batch_norm_forward(x, two, None, 1e-5),
        "bias": lambda: nb.batch_norm_forward(x, None, two, 1e-5),
        "running_mean": lambda: nb.batch_norm_eval(x, two, three, None, None, 1e-5),
        "running_var": lambda: nb.batch_norm_eval(x, three, two, None, None, 1e-5),
        "invstd": lambda: nb.update_running_stats(
            three.clone(), three.clone(), three, two, 0.1, 1e-5, 20
        ),
    }
    for name, call in calls.items():
        expected = f"^{name} should contain 3 elements not 2$"
        with pytest.raises(RuntimeError, match=expected):
            call()


@pytest.mark.parametrize(
    ("args", "name"),
    [
        # running statistics tracked by autograd, in training and in eval
        ((torch.zeros(3, requires_grad=True), torch.ones(3), None, None, True), "running_mean"),
        ((torch.zeros(3), torch.ones(3, requires_grad=True), None, None, False), "running_var"),
        # mixed dtypes: a float64 weight with float32 input
        ((None, None, torch.ones(3, dtype=torch.float64), None, True), None),
        # float32 running statistics with float16 weight and input
        ((torch.zeros(3), torch.ones(3), torch.ones(3).half(), None, True), None),
        # a meta weight with a CPU input
        ((None, None, torch.ones(3, device="meta"), None, True), None),
    ],
)
def test_arguments_torch_refuses_are_refused_with_its_error(args, name):
    running_mean, running_var, weight, bias, training = args
    x = torch.randn(4, 3, 5).half() if weight is not None and weight.dtype == torch.half else None
    x = torch.randn(4, 3, 5) if x is None else x

    def call(fn):
        return fn(x, running_mean, running_var, weight, bias, training=training)

    kind, message = torch_error(lambda: call(F.batch_norm))
    message = message.replace("'native_batch_norm'", "'batch_norm'")  # named as normbench's
    with pytest.raises(kind, match=f"^{re.escape(message)}$"):
        call(batch_norm)
    if name is not None:
        assert f"argument '{name}'" in message


def test_a_refused_training_step_still_counts_the_batch_as_torchs_module_does():
    """torch's module adds 1 to num_batches_tracked before F.batch_norm checks anything."""
    from normbench.norms import BatchNorm1d

    ours, theirs = BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    for module in (ours, theirs):
        module.weight = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        with pytest.raises(RuntimeError, match="mixed dtype"):
            module(torch.randn(4, 3))
    assert ours.num_batches_tracked == theirs.num_batches_tracked == 1


def test_expanded_running_statistics_are_not_written_over_each_other():
    """An expanded running statistic has one memory location for every channel: torch
    writes them over each other; normbench refuses to (as torch's in-place operators do).
    A sliced one is updated in place, as torch updates it."""
    x = torch.randn(8, 3)
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        batch_norm(x, torch.zeros(1).expand(3), torch.ones(3), training=True)
    ours, theirs = torch.zeros(3, 2), torch.zeros(3, 2)
    batch_norm(x, ours[:, 1], torch.ones(3), training=True)
    F.batch_norm(x, theirs[:, 1], torch.ones(3), training=True)
    torch.testing.assert_close(ours, theirs)
    # read-only in eval: an expanded statistic is as good as any
    y = batch_norm(x, torch.zeros(1).expand(3), torch.ones(3))
    torch.testing.assert_close(y, F.batch_norm(x, torch.zeros(3), torch.ones(3)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_infinite_value_gives_torchs_nans_and_infinities(backend):
    """A NaN variance was clamped to 0 (invstd 1/sqrt(eps)), and an infinite first value made
    its channel's mean NaN: the running statistics are torch's (inf, NaN), and so is y."""
    x = torch.tensor([[float("inf"), 1.0], [2.0, 3.0], [1.0, 1.0]])
    rm, rv, rmt, rvt = torch.zeros(2), torch.ones(2), torch.zeros(2), torch.ones(2)
    y = batch_norm(x, rm, rv, training=True, backend=backend)
    yt = F.batch_norm(x, rmt, rvt, training=True)
    torch.testing.assert_close(y, yt, equal_nan=True)
    torch.testing.assert_close(rm, rmt, equal_nan=True)
    torch.testing.assert_close(rv, rvt, equal_nan=True)
    assert math.isinf(rm[0]) and math.isnan(rv[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_with_a_zero_variance_and_no_eps_gives_torchs_nans(backend):
    """eps = 0 with a zero running variance: torch's x * inf + (bias - mean * inf)."""
    x = torch.tensor([[1.0, 2.0, -1.0], [2.0, 3.0, 0.0]])
    rm, rv = torch.tensor([1.0, 0.0, 1.0]), torch.zeros(3)
    w = torch.tensor([0.0, 1.0, 1.0])
    y = batch_norm(x, rm, rv, w, None, training=False, eps=0.0, backend=backend)
    yt = F.batch_norm(x, rm, rv, w, None, training=False, eps=0.0)
    torch.testing.assert_close(y, yt, equal_nan=True)
    assert y.isnan().any() and y.isinf().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_eval_weight_gradient_with_an_infinite_invstd_is_torchs(backend):
    """eps = 0 with a zero running variance: torch scales sum(dy * (x - mean)) by the
    infinite invstd after the sum (+-inf; NaN only where the sum is 0). Scaled per value,
    dy's mixed signs made inf - inf = NaN (kernel fuzz, seed 13, case 3254)."""
    x = torch.tensor([[1.0, 2.0, 3.0], [2.0, 3.0, 0.0], [4.0, 1.0, 1.0]])
    rm, rv = torch.tensor([0.5, 1.0, 1.0]), torch.zeros(3)
    dy = torch.tensor([[1.0, -1.0, 1.0], [-0.5, 2.0, 1.0], [1.0, -3.0, -1.0]])
    w, wt = (torch.ones(3, requires_grad=True) for _ in range(2))
    batch_norm(x, rm, rv, w, None, training=False, eps=0.0, backend=backend).backward(dy)
    F.batch_norm(x, rm, rv, wt, None, training=False, eps=0.0).backward(dy)
    torch.testing.assert_close(w.grad, wt.grad, equal_nan=True)
    assert w.grad.isinf().all()  # +-inf in every channel: none is NaN


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_fused_relu_passes_the_gradient_where_its_input_is_nan_as_torch(backend):
    """torch's threshold_backward zeroes the gradient where the output is <= 0: a NaN passes
    it (the kernels zeroed it: the bias's gradient was 0 where torch's is the sum of dy)."""
    x = torch.tensor([[1.0, float("inf")], [0.5, 1.0], [2.0, 3.0]])
    b, bt = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    batch_norm(x, None, None, None, b, training=True, relu=True, backend=backend).sum().backward()
    torch.relu(F.batch_norm(x, None, None, None, bt, training=True)).sum().backward()
    torch.testing.assert_close(b.grad, bt.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_eval_gradient_of_a_bias_without_a_weight(backend):
    """The eval's autograd node counted its inputs as if the weight were always given: a
    bias without one failed with 'Index out of range' in the backward."""
    x = torch.randn(4, 3, dtype=torch.float64)
    b, bt = (torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    stats = (torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    batch_norm(x, *stats, None, b, backend=backend).sum().backward()
    F.batch_norm(x, *stats, None, bt).sum().backward()
    torch.testing.assert_close(b.grad, torch.full((3,), 4.0, dtype=torch.float64))
    torch.testing.assert_close(bt.grad, b.grad)


def test_a_counter_of_another_dtype_is_counted_as_torchs_module_counts_it():
    """torch's module adds 1 to whatever num_batches_tracked is; the update did the same only
    for a one-element int64 and refused the rest."""
    x = torch.randn(6, 3)
    ours, theirs = torch.tensor(2.0), torch.tensor(2.0)
    batch_norm_tracked(x, torch.zeros(3), torch.ones(3), ours, None, None, None, 1e-5)
    theirs.add_(1)
    assert ours == theirs == 3.0


def test_the_triton_implementations_check_their_arguments_before_launching(triton_backend):
    """The Triton kernels (here under Triton's interpreter) read a (1, C) weight right and
    refuse what the C++ kernels refuse, with the same messages, before any launch."""
    device = "cuda" if triton_backend == "triton" else "cpu"
    x = torch.randn(8, 16, device=device, dtype=torch.float64)
    w = torch.randn(1, 16, device=device, dtype=torch.float64)
    y = batch_norm(x, None, None, w, None, training=True, backend=triton_backend)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, w.reshape(-1), training=True))
    nb = ops.library()
    _, mean, invstd = nb.batch_norm_forward(x, None, None, 1e-5)
    with pytest.raises(RuntimeError, match=r"^grad_out should have the input's shape \[8, 16\]"):
        nb.batch_norm_backward(torch.randn(4, 16, device=device).double(), x, None, None,
                               mean, invstd)  # fmt: skip
    with pytest.raises(RuntimeError, match="^running_var should contain 16 elements not 3"):
        nb.batch_norm_eval(x, torch.zeros(16, device=device).double(),
                           torch.ones(3, device=device).double(), None, None, 1e-5)  # fmt: skip
    with pytest.raises(RuntimeError, match="^expected running_mean to have 1 dims"):
        batch_norm(x, torch.zeros(1, 16, device=device).double(),
                   torch.ones(16, device=device).double(), backend=triton_backend)  # fmt: skip


def test_a_machine_without_cuda_never_imports_triton():
    """The operators' CUDA implementations (Triton's) are registered only where CUDA is:
    a CPU-only process loads the library and runs the kernel without importing triton
    (a fifth of a second of every run's start)."""
    code = (
        "import sys, torch\n"
        "from normbench.kernels import ops\n"
        "x = torch.randn(4, 3)\n"
        "print(ops.resolve_backend('auto', x), 'triton' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    backend, imported = done.stdout.split()
    assert backend == "cpu"
    assert imported == str(torch.cuda.is_available())
