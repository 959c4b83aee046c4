"""Tests for normbench.models: shapes, structure, and norm layers from the registry."""

import pytest
import torch
from torch import nn

from normbench.errors import UserError
from normbench.models import build_model, model_names
from normbench.norms import NormSpec, get_norm, norm_names

INPUTS = {"digits": (1, 8, 8), "cifar": (3, 32, 32)}


def _build(model, norm, shape=(1, 8, 8), **kwargs):
    return build_model(model, NormSpec(norm, kwargs), shape[0], 10, shape[1:])


# Every pairing a user can pick; mlp with instance norm is refused (tested below).
PAIRS = [
    (model, norm)
    for model in ("small_cnn", "resnet20", "mlp")
    for norm in norm_names()
    if not (model == "mlp" and NormSpec(norm).needs_spatial)
]


@pytest.mark.parametrize("model, norm", PAIRS)
@pytest.mark.parametrize("shape", INPUTS.values(), ids=INPUTS.keys())
def test_every_model_trains_with_every_norm(model, norm, shape):
    torch.manual_seed(0)
    net = _build(model, norm, shape)
    x = torch.randn(4, *shape)
    out = net(x)
    assert out.shape == (4, 10)
    out.logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.eval()
    assert torch.isfinite(net(x)).all()
    # Every normalization layer in the model is the registry's class.
    cls = get_norm(norm)
    assert any(isinstance(m, cls) for m in net.modules())


def test_models_registered():
    assert set(model_names()) == {"small_cnn", "resnet20", "mlp"}


def test_small_cnn_is_the_designed_network():
    net = _build("small_cnn", "torch_bn", (3, 32, 32))
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128]
    assert all(c.kernel_size == (3, 3) and c.bias is None for c in convs)
    kinds = [type(m).__name__ for m in net]
    assert kinds[:4] == ["Conv2d", kinds[1], "ReLU", "MaxPool2d"]
    assert kinds[4:8] == ["Conv2d", kinds[1], "ReLU", "MaxPool2d"]
    assert kinds[8:] == ["Conv2d", kinds[1], "ReLU", "AdaptiveAvgPool2d", "Flatten", "Linear"]
    assert sum(isinstance(m, get_norm("torch_bn")) for m in net) == 3


def test_convolutions_keep_their_bias_without_a_norm():
    net = _build("small_cnn", "none")
    assert all(m.bias is not None for m in net if isinstance(m, nn.Conv2d))


def test_resnet20_matches_he_et_al():
    net = _build("resnet20", "torch_bn", (3, 32, 32))
    params = sum(p.numel() for p in net.parameters())
    assert round(params / 1e4) == 27  # "0.27M" in Table 6 of He et al. 2016
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == 20
    assert sorted({c.out_channels for c in convs}) == [16, 32, 64]
    assert sum(isinstance(m, get_norm("torch_bn")) for m in net.modules()) == 19


def test_mlp_uses_1d_norm_layers():
    net = _build("mlp", "custom_bn")
    norms = [m for m in net if isinstance(m, get_norm("custom_bn"))]
    assert [n.num_features for n in norms] == [512, 256]
    seen = []
    norms[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    net(torch.randn(5, 1, 8, 8))
    assert seen == [(5, 512)]


def test_mlp_refuses_norms_that_need_spatial_dims():
    with pytest.raises(ValueError, match="spatial"):
        _build("mlp", "instance")


def test_unknown_model():
    with pytest.raises(UserError, match="unknown model"):
        _build("vgg", "none")
