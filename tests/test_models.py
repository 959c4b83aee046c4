"""Tests for normbench.models: shapes, structure, and norm layers from the registry."""

from unittest import mock

import pytest
import torch
from torch import nn

from normbench.errors import UserError
from normbench.models import build_model, choose_memory_format, model_names, set_memory_format
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


# --- memory layout ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, device, model, norm, expected",
    [
        ("auto", "cpu", "small_cnn", "custom_bn", "channels_last"),
        ("auto", "cpu", "resnet20", "torch_bn", "channels_last"),
        ("auto", "cpu", "small_cnn", "instance", "contiguous"),  # slower on channels_last
        ("auto", "cpu", "small_cnn", "frn", "contiguous"),
        ("auto", "cpu", "mlp", "custom_bn", "contiguous"),  # no convolution to gain
        ("auto", "cuda", "small_cnn", "custom_bn", "contiguous"),  # not measured there
        ("contiguous", "cpu", "small_cnn", "custom_bn", "contiguous"),
        ("channels_last", "cpu", "small_cnn", "instance", "channels_last"),
        ("channels_last", "cuda", "mlp", "layer", "channels_last"),
    ],
)
def test_choose_memory_format(setting, device, model, norm, expected):
    net = _build(model, norm)
    assert choose_memory_format(setting, device, net, NormSpec(norm)) == expected


def test_auto_leaves_a_variant_that_does_not_say_contiguous():
    class Plain(nn.BatchNorm2d):  # a user's class, without prefers_channels_last
        pass

    net = _build("small_cnn", "custom_bn")
    spec = NormSpec("plain", target=f"{__name__}.Plain")
    with mock.patch(f"{__name__}.Plain", Plain, create=True):
        assert choose_memory_format("auto", "cpu", net, spec) == "contiguous"


def _layouts(net, x):
    """Each 4-d activation's layout, from the model's own forward (its hooks included)."""
    seen = []

    def record(module, args, out):
        if out.dim() == 4 and min(out.shape[1:]) > 1:
            seen.append("channels_last" if out.stride()[1] == 1 else "contiguous")

    for m in net:
        m.register_forward_hook(record)
    net(x)
    return seen


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("channels", [1, 3])
def test_set_memory_format_runs_every_activation_in_the_layout(layout, channels):
    torch.manual_seed(0)
    net = _build("small_cnn", "custom_bn", (channels, 12, 12))
    set_memory_format(net, layout)
    # a one-channel batch as numpy hands it over: strides (HW, 1, W, 1), both layouts at
    # once, which torch's convolutions read as channels_last
    x = torch.randn(5, 12, 12, channels).permute(0, 3, 1, 2)
    assert x.is_contiguous() == (channels == 1)
    layouts = _layouts(net, x)
    assert len(layouts) == 11 and set(layouts) == {layout}
    assert all(
        p.is_contiguous(
            memory_format=torch.channels_last
            if layout == "channels_last"
            else torch.contiguous_format
        )
        for p in net.parameters()
        if p.dim() == 4
    )


def test_set_memory_format_refuses_an_unknown_layout():
    with pytest.raises(ValueError, match="unknown layout 'auto'; valid: contiguous, channels_last"):
        set_memory_format(_build("small_cnn", "custom_bn"), "auto")


@pytest.mark.parametrize("model", ["small_cnn", "resnet20", "mlp"])
def test_set_memory_format_keeps_results_gradients_and_state_dict(model):
    nets = {}
    for layout in ("contiguous", "channels_last"):
        torch.manual_seed(0)
        net = _build(model, "custom_bn", (3, 12, 12)).double()
        set_memory_format(net, layout)
        nets[layout] = net
    x = torch.randn(6, 3, 12, 12, dtype=torch.float64)
    outs = {k: net(x) for k, net in nets.items()}
    torch.testing.assert_close(outs["channels_last"], outs["contiguous"], rtol=1e-10, atol=1e-12)
    for out in outs.values():
        out.square().sum().backward()
    grads = [dict(net.named_parameters()) for net in nets.values()]
    for name, p in grads[0].items():
        torch.testing.assert_close(grads[1][name].grad, p.grad, rtol=1e-9, atol=1e-12)
    state = nets["channels_last"].state_dict()
    assert state.keys() == nets["contiguous"].state_dict().keys()
    fresh = _build(model, "custom_bn", (3, 12, 12)).double()
    fresh.load_state_dict(state)  # a checkpoint from either layout loads into the other
    torch.testing.assert_close(fresh.eval()(x), nets["channels_last"].eval()(x))
