"""Mixed precision: float16 and bfloat16 inputs in the kernel and in every variant.

The kernel computes a low-precision input's statistics in float32 (from float64 sums) and
writes its output in the input's dtype; the running statistics, weight and bias stay float32
(torch's mixed-dtype rule, as cuDNN's). References: float64 statistics of the same
(already rounded) input, and torch's own layers under ``torch.autocast``.
"""

from __future__ import annotations

import pytest
import torch

from normbench.kernels import (
    batch_norm,
    batch_norm_stats,
    batch_norm_synced,
    batch_norm_tracked,
)

LOW = [torch.bfloat16, torch.float16]
#: the dtype's rounding: half an ulp of 1 (bfloat16: 8 significant bits, float16: 11)
ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _input(dtype, mean=3.0, layout="contiguous"):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(16, 8, 7, 7, generator=g, dtype=torch.float64) * 2 + mean).to(dtype)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_statistics_are_float32_of_the_exact_sums(dtype, layout, backend):
    """The statistics of a float16/bfloat16 input are float32 and match the float64 ones of
    the same values to float32's precision (a large mean too: shifted sums); the output is
    in the input's dtype, within its rounding of the float64 result."""
    for mean_value in (3.0, 100.0):
        x = _input(dtype, mean_value, layout)
        mean, invstd = batch_norm_stats(x, 1e-5, backend)
        assert mean.dtype == invstd.dtype == torch.float32
        exact = x.double()
        dims = [0, 2, 3]
        ref_mean = exact.mean(dims)
        ref_invstd = ((exact - ref_mean.view(1, -1, 1, 1)).square().mean(dims) + 1e-5).rsqrt()
        torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(invstd.double(), ref_invstd, rtol=1e-5, atol=0)

        w, b = torch.randn(8), torch.randn(8)  # float32 parameters with a low-precision input
        rm, rv = torch.zeros(8), torch.ones(8)
        count = torch.zeros((), dtype=torch.long)
        y = batch_norm_tracked(x, rm, rv, count, w, b, 0.1, 1e-5, backend)
        assert y.dtype == dtype and rm.dtype == rv.dtype == torch.float32
        ref_y = (exact - ref_mean.view(1, -1, 1, 1)) * ref_invstd.view(1, -1, 1, 1)
        ref_y = ref_y * w.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1)
        bound = ULP[dtype] * ref_y.abs().max().item() * 2
        torch.testing.assert_close(y.double(), ref_y, rtol=0, atol=bound)
        n = x.numel() // 8
        torch.testing.assert_close(rm.double(), 0.1 * ref_mean, rtol=1e-6, atol=1e-6)
        ref_var = ref_invstd.pow(-2) - 1e-5
        torch.testing.assert_close(
            rv.double(), 0.9 + 0.1 * ref_var * n / (n - 1), rtol=1e-5, atol=0
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
def test_synced_with_one_part_is_the_tracked_forward(dtype, relu):
    """batch_norm_synced whose reduction leaves its sums as they are (one process) gives
    batch_norm_tracked's outputs, gradients and running statistics: float64 to 1e-12, a
    bfloat16 input (float32 parameters) within its rounding."""
    x0 = _input(dtype)
    dy = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    results = []
    for synced in (False, True):
        x = x0.clone().requires_grad_(True)
        w = torch.linspace(0.5, 1.5, 8, dtype=pdtype).requires_grad_(True)
        b = torch.linspace(-1, 1, 8, dtype=pdtype).requires_grad_(True)
        rm, rv = torch.zeros(8, dtype=pdtype), torch.ones(8, dtype=pdtype)
        count = torch.zeros((), dtype=torch.long)
        if synced:
            y = batch_norm_synced(
                x, rm, rv, count, w, b, 0.1, 1e-5,
                lambda sums: None, relu=relu,
            )  # fmt: skip
        else:
            y = batch_norm_tracked(x, rm, rv, count, w, b, 0.1, 1e-5, relu=relu)
        (y.float() * dy.float()).sum().backward()
        assert y.dtype == x.grad.dtype == dtype and w.grad.dtype == pdtype
        results.append((y, x.grad, w.grad, b.grad, rm, rv, count))
    tol = 1e-12 if dtype == torch.float64 else 4 * ULP[torch.bfloat16] * 8
    for ours, theirs in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours.double(), theirs.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_eval_gradients_are_computed_in_float32(dtype, relu):
    """The eval-mode backward (running statistics) of a float16/bfloat16 input with float32
    parameters computes in float32, as torch's: weight and bias gradients match float64
    of the same values to float32's precision (in bfloat16 arithmetic they were off by
    about bfloat16's epsilon), dx within one rounding of its dtype."""
    x0 = _input(dtype, mean=0.5)
    dy = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    rm, rv = torch.linspace(-0.5, 0.5, 8), torch.linspace(0.5, 2.0, 8)
    got, want = [], []
    for exact in (False, True):
        cast = (lambda t: t.double()) if exact else (lambda t: t)
        x = cast(x0).clone().requires_grad_(True)
        w = cast(torch.linspace(0.5, 1.5, 8)).requires_grad_(True)
        b = cast(torch.linspace(-1.0, 1.0, 8)).requires_grad_(True)
        if exact:
            y = torch.nn.functional.batch_norm(x, rm.double(), rv.double(), w, b, False, 0.1, 1e-5)
            y = torch.relu(y) if relu else y
        else:
            y = batch_norm(x, rm, rv, w, b, training=False, relu=relu)
        (y.double() * dy.double()).sum().backward()
        (want if exact else got).extend([x.grad, w.grad, b.grad])
    assert got[0].dtype == dtype and got[1].dtype == got[2].dtype == torch.float32
    torch.testing.assert_close(got[0].double(), want[0], rtol=ULP[dtype] * 2, atol=ULP[dtype])
    for ours, theirs in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-4)


def _variants():
    from normbench.norms import norm_names

    return norm_names()


@pytest.mark.parametrize("name", _variants())
def test_every_variant_trains_under_bfloat16_autocast(name):
    """Forward and backward of every registered variant under CPU autocast (bfloat16), at
    small_cnn's sizes: finite outputs and gradients, the output in bfloat16 (as torch's own
    BatchNorm2d and GroupNorm give under autocast), parameters, their gradients and running
    statistics in float32."""
    from normbench.norms import NormSpec

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 16, 3, padding=1)
    layer, act = NormSpec(name, {}).with_activation(16)
    layer.train()
    x = torch.randn(32, 1, 28, 28, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = act(layer(h))
        torchs = torch.nn.BatchNorm2d(16)(h)
    assert h.dtype == torch.bfloat16
    assert y.dtype == torchs.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert torch.isfinite(y.float()).all() and torch.isfinite(x.grad).all()
    for p in layer.parameters():
        assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all()
    for buffer in layer.buffers():
        if buffer.is_floating_point():
            assert buffer.dtype == torch.float32 and torch.isfinite(buffer).all()
