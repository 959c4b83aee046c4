"""The norm and its ReLU in one layer (``relu=True``, handed out by NormSpec.with_activation):
against the norm followed by torch's ReLU, in float64 and bit for bit in float32."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normbench.kernels import batch_norm
from normbench.models import build_model
from normbench.norms import NormSpec

SHAPES = [(8, 6, 5, 5), (16, 6), (4, 6, 3, 2, 2)]
FUSING = ["custom_bn", "ghost_bn", "batch_renorm"]


def pair(name: str, backend: str, dtype: torch.dtype):
    """The fused layer and the same layer followed by a ReLU, with equal parameters."""
    kwargs = {"backend": backend} | {
        "ghost_bn": {"virtual_batch_size": 4},
        # past the warm-up, well into the ramp: r and d bind
        "batch_renorm": {"warmup_steps": 0, "ramp_steps": 1, "r_max": 1.5, "d_max": 0.5},
    }.get(name, {})
    spec = NormSpec(name, kwargs)
    fused, after = spec.with_activation(6)
    plain = nn.Sequential(spec(6), nn.ReLU())
    assert isinstance(after, nn.Identity) and fused.relu
    with torch.no_grad():
        fused.weight.copy_(torch.randn(6) * 0.5 + 1)
        fused.bias.copy_(torch.randn(6) * 0.5)
        if name == "batch_renorm":  # running statistics away from the batch's
            fused.running_mean.fill_(0.3)
            fused.running_std.fill_(2.0)
    plain[0].load_state_dict(fused.state_dict())
    return fused.to(dtype), plain.to(dtype)


def run(layer, x, dy, layout=None):
    x = x.clone()
    if layout is not None:
        x = x.contiguous(memory_format=layout)
    x.requires_grad_(True)
    layer.train()
    y = layer(x)
    y.backward(dy)
    norm = layer if not isinstance(layer, nn.Sequential) else layer[0]
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x)
    return y, x.grad, norm.weight.grad, norm.bias.grad, *norm.buffers(), y_eval


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", FUSING)
def test_fused_matches_norm_then_relu_in_float64(name, shape, backend):
    torch.manual_seed(0)
    fused, plain = pair(name, backend, torch.float64)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    dy = torch.randn(shape, dtype=torch.float64)
    for ours, theirs in zip(run(fused, x, dy), run(plain, x, dy), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", [None, torch.channels_last])
@pytest.mark.parametrize("name", FUSING)
def test_fused_is_bit_identical_to_norm_then_relu_on_the_kernel(name, layout):
    """float32 on the CPU kernel: the same arithmetic in the same order, so the same bits
    (outputs, every gradient, the running statistics, eval)."""
    torch.manual_seed(1)
    fused, plain = pair(name, "cpu", torch.float32)
    x, dy = torch.randn(16, 6, 7, 7) * 3 - 1, torch.randn(16, 6, 7, 7)
    for ours, theirs in zip(run(fused, x, dy, layout), run(plain, x, dy, layout), strict=True):
        assert torch.equal(ours, theirs)


def test_the_functional_takes_relu_in_training_and_eval():
    torch.manual_seed(2)
    x = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    for training in (True, False):
        ours = batch_norm(x, rm.clone(), rv.clone(), training=training, relu=True)
        theirs = torch.relu(
            torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), training=training)
        )
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["torch_bn", "layer", "group", "frn"])
def test_other_variants_keep_the_plain_composition(name):
    spec = NormSpec(name, {"groups": 2} if name == "group" else {})
    layer, after = spec.with_activation(6)
    assert not getattr(layer, "relu", False)
    assert type(after) is type(spec.activation())


@pytest.mark.parametrize("model", ["small_cnn", "mlp", "resnet20"])
def test_models_take_the_fused_layer_and_keep_their_state_dict_keys(model):
    fused = build_model(model, NormSpec("custom_bn"), 1, 10, (28, 28))
    plain = build_model(model, NormSpec("torch_bn"), 1, 10, (28, 28))
    assert fused.state_dict().keys() == plain.state_dict().keys()
    norms = [m for m in fused.modules() if isinstance(m, NormSpec("custom_bn").cls)]
    assert norms and any(m.relu for m in norms)
    if model == "resnet20":  # the norm before the residual sum keeps its own ReLU after it
        assert not all(m.relu for m in norms)
    fused.load_state_dict(copy.deepcopy(plain.state_dict()))


@pytest.fixture
def on_triton():
    """The operators on the Triton kernels: CUDA where there is one, else the interpreter."""
    from normbench.kernels import ops

    if ops._triton() is None:
        pytest.fail("triton did not import")  # it ships with torch's Linux builds
    if torch.cuda.is_available():
        yield "cuda"
        return
    with ops.triton_on_cpu():
        yield "cpu"


@pytest.mark.parametrize("shape", [(6, 6, 4, 4), (12, 6)])
@pytest.mark.parametrize("name", FUSING)
def test_the_triton_kernels_fuse_the_relu_too(on_triton, name, shape):
    torch.manual_seed(4)
    fused, plain = pair(name, "auto", torch.float64)
    fused, plain = fused.to(on_triton), plain.to(on_triton)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(on_triton)
    dy = torch.randn(shape, dtype=torch.float64).to(on_triton)
    for ours, theirs in zip(run(fused, x, dy), run(plain, x, dy), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
