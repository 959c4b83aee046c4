"""The BatchNorm kernel: reference vs float64 math and torch, autograd glue, functional."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from normbench.kernels import BatchNormFunction, batch_norm, batch_norm_train, reference

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


def test_zero_variance_channel_is_finite():
    x = torch.randn(4, 3, 5, 5, requires_grad=False)
    x[:, 1] = 7.0
    x.requires_grad_(True)
    y, _, _ = BatchNormFunction.apply(x, torch.ones(3), torch.zeros(3), 1e-5)
    y.backward(torch.randn_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert y[:, 1].abs().max() < 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    x = (torch.randn(8, 3, 4, 4) * 2 + 5).to(dtype)
    w, b = torch.randn(3), torch.randn(3)
    y, mean, invstd = reference.forward_train(x, w, b, 1e-5)
    assert y.dtype == dtype and mean.dtype == invstd.dtype == torch.float32
    y64, _, _ = bn64(x, w, b)
    torch.testing.assert_close(y.double(), y64, rtol=2e-2, atol=2e-2)

    xg = x.clone().requires_grad_(True)
    wg = w.clone().requires_grad_(True)
    y, _, _ = BatchNormFunction.apply(xg, wg, None, 1e-5)
    y.float().sum().backward()
    assert xg.grad.dtype == dtype and wg.grad.dtype == torch.float32


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
        assert dw is None


def test_backward_output_mask():
    x = torch.randn(4, 3, 2, 2)
    w = torch.randn(3)
    _, mean, invstd = reference.forward_train(x, w, None, 1e-5)
    dx, dw, db = reference.backward(torch.randn_like(x), x, w, mean, invstd, (False, True, False))
    assert dx is None and db is None and dw.shape == (3,)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(3, 2), (3, 2, 2, 2)])
def test_gradcheck(affine, shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    params = (
        (
            torch.randn(2, dtype=torch.float64, requires_grad=True),
            torch.randn(2, dtype=torch.float64, requires_grad=True),
        )
        if affine
        else (None, None)
    )

    def fn(x, w, b):
        return BatchNormFunction.apply(x, w, b, 1e-5)[0]

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_function_outputs_stats_without_grad():
    x = torch.randn(4, 3, requires_grad=True)
    y, mean, invstd = BatchNormFunction.apply(x, None, None, 1e-5)
    assert y.requires_grad and not mean.requires_grad and not invstd.requires_grad


# --- the functional, against torch.nn.functional.batch_norm ---------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("momentum", [0.1, 1.0, 0.5])
@pytest.mark.parametrize("params", ["both", "weight_only", "none"])
def test_functional_training_matches_torch(shape, momentum, params):
    c = shape[1]
    w = torch.randn(c) if params != "none" else None
    b = torch.randn(c) if params == "both" else None
    ours_stats = [torch.randn(c), torch.rand(c) + 0.5]
    torch_stats = [s.clone() for s in ours_stats]
    for _ in range(3):
        x, dy = torch.randn(shape) * 2 + 1, torch.randn(shape)
        results = []
        for fn, (rm, rv) in ((batch_norm, ours_stats), (F.batch_norm, torch_stats)):
            xs, ws, bs = (None if t is None else t.clone().requires_grad_(True) for t in (x, w, b))
            y = fn(xs, rm, rv, ws, bs, True, momentum, 1e-5)
            leaves = [t for t in (xs, ws, bs) if t is not None]
            results.append((y, torch.autograd.grad(y, leaves, dy)))
        (y, grads), (yt, grads_t) = results
        torch.testing.assert_close(y, yt, **TOL32)
        torch.testing.assert_close(grads, grads_t, **TOL32)
        torch.testing.assert_close(ours_stats, torch_stats, **TOL32)


def test_functional_eval_matches_torch():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    xt = x.detach().clone().requires_grad_(True)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    w = torch.randn(3, requires_grad=True)
    wt = w.detach().clone().requires_grad_(True)
    y = batch_norm(x, rm, rv, w, None, False, 0.1, 1e-3)
    yt = F.batch_norm(xt, rm, rv, wt, None, False, 0.1, 1e-3)
    torch.testing.assert_close(y, yt)
    dy = torch.randn_like(y)
    y.backward(dy)
    yt.backward(dy)
    torch.testing.assert_close(x.grad, xt.grad)
    torch.testing.assert_close(w.grad, wt.grad)


def test_functional_without_running_stats_uses_batch_stats():
    x = torch.randn(4, 3, 2)
    torch.testing.assert_close(
        batch_norm(x, None, None, training=True), F.batch_norm(x, None, None, training=True)
    )


def torch_error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return info.type, str(info.value)


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
    for call in (
        lambda fn: fn(x, None, None, training=True, eps=0.0),
        lambda fn: fn(x, torch.zeros(3), torch.ones(3), training=False, eps=-1.0),
        lambda fn: fn(x, None, None, training=False),
    ):
        kind, message = torch_error(lambda call=call: call(F.batch_norm))
        with pytest.raises(kind, match=f"^{re.escape(message)}$"):
            call(batch_norm)
