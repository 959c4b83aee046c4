"""Normalization variants: every registered one, and each against an independent reference."""

from __future__ import annotations

import importlib.util
import inspect
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch_contract import CHECKS_AS_NORMBENCH, TORCH_TAKES_BIAS, eps_error, expected_error

from normbench.errors import UserError
from normbench.norms import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm,
    BatchRenorm2d,
    GhostBatchNorm,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    NormSpec,
    get_norm,
    group_count,
    norm_names,
)
from normbench.norms.batchrenorm import schedule_steps
from normbench.schema import RENORM_PHASES

C = 16
CONF = Path(__file__).resolve().parents[1] / "normbench" / "conf" / "norm"
TOL32 = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize(module: nn.Module) -> nn.Module:
    """Move parameters off their initial values, so tests see weight and bias act."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1)
    return module


def train_steps(module: nn.Module, shape, steps: int = 3) -> None:
    module.train()
    for _ in range(steps):
        module(torch.randn(shape) * 2 + 1)


# --- the registry and the configs -----------------------------------------------------------


DESIGN_VARIANTS = [
    "custom_bn",
    "torch_bn",
    "layer",
    "instance",
    "group",
    "batch_renorm",
    "ghost_bn",
    "none",
]


def test_registry_lists_every_variant():
    # DESIGN.md's variants first, in its order; a variant added later comes after them.
    assert norm_names()[: len(DESIGN_VARIANTS)] == DESIGN_VARIANTS
    with pytest.raises(UserError, match="unknown norm 'batch'.*custom_bn"):
        get_norm("batch")


def test_normspec_reads_class_attributes():
    for name in DESIGN_VARIANTS:
        spec = NormSpec(name)
        assert spec.centers == (name != "none")
        assert spec.needs_spatial == (name == "instance")
        # measured slower, or no faster, a step on channels_last
        # (docs/configuration.md#memory-layout)
        assert spec.prefers_channels_last == (name not in ("instance", "frn", "evonorm_s0"))
    layer = NormSpec("group", {"groups": 4})(12)
    assert isinstance(layer, GroupNorm) and layer.num_groups == 4


def test_one_config_per_variant():
    assert sorted(p.stem for p in CONF.glob("*.yaml")) == sorted(norm_names())


@pytest.mark.parametrize("name", norm_names())
def test_config_keys_are_constructor_defaults(name):
    path = CONF / f"{name}.yaml"
    first = path.read_text().splitlines()[0]
    assert re.fullmatch(r"# \S.*", first), f"{path} must start with '# <description>'"
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    assert cfg.pop("name") == name
    cls = get_norm(name)
    params = inspect.signature(cls).parameters
    # Batch Renorm's schedule is the run's (shares of its steps), turned into the
    # constructor's warmup_steps/ramp_steps by the runner (schedule_steps)
    schedule = {key for phase in RENORM_PHASES for key in phase}
    for key, value in cfg.items():
        if key in schedule:
            continue
        assert key in params, f"{name}: {key} is not a constructor argument"
        assert value == params[key].default, f"{name}: {key}={value} differs from the default"
    cls(C, **schedule_steps(cfg, 1000))


# --- every variant -----------------------------------------------------------------------------

SHAPES = [(6, C), (4, C, 7), (4, C, 5, 6), (2, C, 3, 4, 5)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("name", norm_names())
def test_every_variant_runs_in_train_and_eval(name, shape):
    layer = get_norm(name)(C)
    x = torch.randn(shape) * 3 + 1
    if len(shape) == 2 and NormSpec(name).needs_spatial:
        with pytest.raises(ValueError, match="spatial"):
            layer(x)
        return
    for training in (True, False):
        layer.train(training)
        y = layer(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", norm_names())
def test_every_variant_state_dict_round_trip(name):
    shape = (8, C, 4, 4)
    layer = randomize(get_norm(name)(C))
    train_steps(layer, shape)
    fresh = get_norm(name)(C)
    fresh.load_state_dict(layer.state_dict())
    layer.eval()
    fresh.eval()
    x = torch.randn(shape)
    assert torch.equal(layer(x), fresh(x))


@pytest.mark.parametrize("name", norm_names())
def test_every_variant_backward_reaches_every_parameter(name):
    layer = randomize(get_norm(name)(C))
    x = torch.randn(4, C, 5, 5, requires_grad=True)
    y = layer(x)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", norm_names())
def test_every_variant_is_the_same_on_channels_last(name):
    """memory_format=channels_last hands every variant channels_last activations: the
    outputs, the input and parameter gradients and the running statistics are those of
    the contiguous input (float64)."""
    layers = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        layer = randomize(get_norm(name)(C)).double()
        torch.manual_seed(1)
        x = torch.randn(4, C, 5, 6, dtype=torch.float64) * 2 + 1
        dy = torch.randn_like(x)
        x = x.contiguous(memory_format=fmt).requires_grad_()
        layer.train()
        y = layer(x)
        (y * dy).sum().backward()
        layer.eval()
        layers.append((y, x.grad, layer, layer(x.detach())))
    (y0, dx0, ref, e0), (y1, dx1, layer, e1) = layers
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx1, dx0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(e1, e0, rtol=1e-12, atol=1e-12)
    grads = {n: p.grad for n, p in ref.named_parameters()}
    for pname, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, grads[pname], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.state_dict(), ref.state_dict(), rtol=1e-12, atol=1e-12)


# --- custom_bn against torch.nn.BatchNorm*d ----------------------------------------------------

BN_PAIRS = [
    (BatchNorm1d, nn.BatchNorm1d, (8, 3)),
    (BatchNorm1d, nn.BatchNorm1d, (4, 3, 5)),
    (BatchNorm2d, nn.BatchNorm2d, (4, 3, 5, 6)),
    (BatchNorm3d, nn.BatchNorm3d, (2, 3, 3, 4, 5)),
]
BN_IDS = ["1d-2D", "1d-3D", "2d", "3d"]
BN_OPTIONS = [
    {},
    {"momentum": None},
    {"affine": False},
    {"track_running_stats": False},
    {"momentum": 0.5, "eps": 1e-3},
]


def assert_same_bn(ours, theirs, shape, *, fmt=None, dtype=torch.float32, steps=3):
    """Same outputs, gradients and buffers over training steps and then in eval mode."""
    tol = TOL32 if dtype == torch.float32 else {}
    theirs.load_state_dict(ours.state_dict())
    for training, n in ((True, steps), (False, 1)):
        ours.train(training)
        theirs.train(training)
        for _ in range(n):
            x = torch.randn(shape, dtype=dtype) * 2 + 1
            if fmt is not None:
                x = x.to(memory_format=fmt)
            dy = torch.randn(shape, dtype=dtype)
            xs, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            y, yt = ours(xs), theirs(xt)
            torch.testing.assert_close(y, yt, **tol)
            if fmt is not None:
                assert y.is_contiguous(memory_format=fmt)
            y.backward(dy)
            yt.backward(dy)
            torch.testing.assert_close(xs.grad, xt.grad, **tol)
            for (name, p), pt in zip(ours.named_parameters(), theirs.parameters(), strict=True):
                torch.testing.assert_close(p.grad, pt.grad, **tol, msg=name)
                p.grad = pt.grad = None
            sd, sdt = ours.state_dict(), theirs.state_dict()
            assert sd.keys() == sdt.keys()
            for key in sd:
                torch.testing.assert_close(sd[key], sdt[key], **tol, msg=key)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("options", BN_OPTIONS, ids=str)
@pytest.mark.parametrize("ours_cls, torch_cls, shape", BN_PAIRS, ids=BN_IDS)
def test_custom_bn_matches_torch(ours_cls, torch_cls, shape, options, backend):
    ours = randomize(ours_cls(3, backend=backend, **options))
    assert_same_bn(ours, torch_cls(3, **options), shape)


@pytest.mark.skipif(not TORCH_TAKES_BIAS, reason="this torch's BatchNorm has no bias keyword")
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("ours_cls, torch_cls, shape", BN_PAIRS, ids=BN_IDS)
def test_custom_bn_without_a_bias_matches_torch(ours_cls, torch_cls, shape, backend):
    ours = randomize(ours_cls(3, backend=backend, bias=False, dtype=torch.float64))
    assert ours.bias is None and ours.weight is not None
    theirs = torch_cls(3, bias=False, dtype=torch.float64)
    assert_same_bn(ours, theirs, shape, dtype=torch.float64)
    assert repr(ours) == repr(theirs)


def test_custom_bn_non_contiguous_input():
    ours, theirs = randomize(BatchNorm2d(3)), nn.BatchNorm2d(3)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 3, 6, 4).transpose(2, 3)[:, :, ::2]
    xs, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, yt = ours(xs), theirs(xt)
    torch.testing.assert_close(y, yt, **TOL32)
    dy = torch.randn_like(yt)
    y.backward(dy)
    yt.backward(dy)
    torch.testing.assert_close(xs.grad, xt.grad, **TOL32)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **TOL32)


def test_custom_bn_refuses_an_unknown_backend():
    with pytest.raises(ValueError, match="unknown norm backend 'gpu'"):
        BatchNorm2d(3, backend="gpu")


@pytest.mark.parametrize(
    "ours_cls, torch_cls, shape, fmt",
    [
        (BatchNorm2d, nn.BatchNorm2d, (4, 3, 5, 6), torch.channels_last),
        (BatchNorm3d, nn.BatchNorm3d, (2, 3, 3, 4, 5), torch.channels_last_3d),
    ],
)
def test_custom_bn_channels_last(ours_cls, torch_cls, shape, fmt):
    assert_same_bn(randomize(ours_cls(3)), torch_cls(3), shape, fmt=fmt)


def test_custom_bn_float64():
    ours = randomize(BatchNorm2d(3, momentum=None, dtype=torch.float64))
    assert_same_bn(
        ours,
        nn.BatchNorm2d(3, momentum=None, dtype=torch.float64),
        (4, 3, 5, 6),
        dtype=torch.float64,
    )


def test_custom_bn_tracking_switched_off_after_construction():
    # torch's quirk, kept: buffers exist but track_running_stats was switched off later
    ours, theirs = randomize(BatchNorm2d(3)), nn.BatchNorm2d(3)
    ours.track_running_stats = theirs.track_running_stats = False
    assert_same_bn(ours, theirs, (4, 3, 2, 2))


def test_custom_bn_state_dict_loads_both_ways():
    ours, theirs = BatchNorm2d(3), randomize(nn.BatchNorm2d(3))
    train_steps(theirs, (4, 3, 5, 5))
    ours.load_state_dict(theirs.state_dict())
    back = nn.BatchNorm2d(3)
    train_steps(ours, (4, 3, 5, 5))
    back.load_state_dict(ours.state_dict())
    for module in (ours, back):
        module.eval()
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(ours(x), back(x))
    assert int(back.num_batches_tracked) == 6


def test_custom_bn_is_a_torch_batchnorm():
    layer = BatchNorm2d(3, eps=1e-3, momentum=0.2, affine=False)
    assert isinstance(layer, nn.modules.batchnorm._BatchNorm)
    assert repr(layer).replace("BatchNorm2d", "X") == repr(
        nn.BatchNorm2d(3, eps=1e-3, momentum=0.2, affine=False)
    ).replace("BatchNorm2d", "X")


@pytest.mark.parametrize("ours_cls, torch_cls, shape", BN_PAIRS[1:], ids=BN_IDS[1:])
def test_custom_bn_one_value_per_channel_error_matches_torch(ours_cls, torch_cls, shape):
    x = torch.randn(1, 3, *([1] * (len(shape) - 2)))
    with pytest.raises(ValueError) as expected:
        torch_cls(3)(x)
    ours = ours_cls(3)
    with pytest.raises(ValueError, match=f"^{re.escape(str(expected.value))}$"):
        ours(x)
    assert int(ours.num_batches_tracked) == 1  # counted before the error, as torch does


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("eps", [0.0, -1.0])
def test_custom_bn_non_positive_eps_error_matches_torch(backend, eps):
    x = torch.randn(2, 3, 2, 2)
    theirs, ours = nn.BatchNorm2d(3, eps=eps), BatchNorm2d(3, eps=eps, backend=backend)
    kind, message = expected_error(lambda: theirs(x), eps_error(eps, training=True))
    with pytest.raises(kind, match=f"^{re.escape(message)}$"):
        ours(x)
    assert int(ours.num_batches_tracked) == 1  # counted before the check, as torch counts
    if CHECKS_AS_NORMBENCH:  # torch's layer ran (and raised) in expected_error
        assert int(theirs.num_batches_tracked) == 1


@pytest.mark.parametrize(
    "ours_cls, torch_cls",
    [(BatchNorm1d, nn.BatchNorm1d), (BatchNorm2d, nn.BatchNorm2d), (BatchNorm3d, nn.BatchNorm3d)],
)
def test_custom_bn_input_dim_errors_match_torch(ours_cls, torch_cls):
    for ndim in range(1, 7):
        x = torch.randn(*([2] * ndim))
        try:
            torch_cls(2)(x)
        except ValueError as expected:
            with pytest.raises(ValueError, match=f"^{re.escape(str(expected))}$"):
                ours_cls(2)(x)
        else:
            ours_cls(2)(x)


def test_dimension_agnostic_bn_matches_torch_on_any_rank():
    custom, baseline = get_norm("custom_bn"), get_norm("torch_bn")
    for shape in SHAPES:
        ours = randomize(custom(C))
        assert_same_bn(ours, baseline(C), shape, steps=2)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        custom(C)(torch.randn(C))


# --- layer, instance, group --------------------------------------------------------------------


def affine(y, layer):
    shape = (1, -1, *([1] * (y.dim() - 2)))
    return y * layer.weight.reshape(shape) + layer.bias.reshape(shape)


@pytest.mark.parametrize("shape", [(6, C), (4, C, 5, 6), (2, C, 3, 4, 5)])
def test_layer_is_layer_norm_then_per_channel_affine(shape):
    layer = randomize(LayerNorm(C, eps=1e-3))
    x = torch.randn(shape) * 2 + 3
    expected = affine(F.layer_norm(x, x.shape[1:], eps=1e-3), layer)
    torch.testing.assert_close(layer(x), expected, **TOL32)


@pytest.mark.parametrize(
    "torch_cls, shape",
    [
        (nn.InstanceNorm1d, (4, C, 7)),
        (nn.InstanceNorm2d, (4, C, 5, 6)),
        (nn.InstanceNorm3d, (2, C, 3, 4, 5)),
    ],
)
def test_instance_matches_torch_instance_norm(torch_cls, shape):
    ours = randomize(InstanceNorm(C))
    theirs = torch_cls(C, affine=True)
    theirs.load_state_dict(ours.state_dict())
    for training in (True, False):
        ours.train(training)
        theirs.train(training)
        x = torch.randn(shape, requires_grad=True)
        xt = x.detach().clone().requires_grad_(True)
        y, yt = ours(x), theirs(xt)
        torch.testing.assert_close(y, yt, **TOL32)
        dy = torch.randn_like(y)
        y.backward(dy)
        yt.backward(dy)
        torch.testing.assert_close(x.grad, xt.grad, **TOL32)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **TOL32)


@pytest.mark.parametrize("shape", [(4, C), (4, C, 1, 1)])
def test_instance_refuses_input_without_spatial_extent(shape):
    with pytest.raises(ValueError, match="instance norm needs spatial dimensions"):
        InstanceNorm(C)(torch.randn(shape))


@pytest.mark.parametrize(
    "channels, groups, expected",
    [(12, 8, 6), (3, 8, 3), (16, 8, 8), (7, 8, 7), (10, 4, 2), (13, 8, 1), (64, 32, 32), (8, 1, 1)],
)
def test_group_count_rule(channels, groups, expected):
    assert group_count(channels, groups) == expected
    assert GroupNorm(channels, groups=groups).num_groups == expected


def test_group_count_rejects_no_groups():
    with pytest.raises(ValueError, match="groups must be at least 1"):
        GroupNorm(8, groups=0)


@pytest.mark.parametrize(
    "channels, groups, shape", [(C, 8, (4, C, 5, 6)), (12, 8, (3, 12, 4)), (C, 4, (4, C))]
)
def test_group_matches_torch_group_norm(channels, groups, shape):
    ours = randomize(GroupNorm(channels, groups=groups, eps=1e-4))
    theirs = nn.GroupNorm(group_count(channels, groups), channels, eps=1e-4)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(shape) * 2 + 1
    torch.testing.assert_close(ours(x), theirs(x), **TOL32)


# --- batch_renorm --------------------------------------------------------------------------


def test_batch_renorm_without_correction_is_batchnorm():
    ours = randomize(BatchRenorm2d(3, r_max=1.0, d_max=0.0, warmup_steps=0, ramp_steps=0))
    bn = nn.BatchNorm2d(3)
    bn.load_state_dict({"weight": ours.weight, "bias": ours.bias}, strict=False)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5) * 3 + 2
        xs, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y, yt = ours(xs), bn(xt)
        torch.testing.assert_close(y, yt, **TOL32)
        dy = torch.randn_like(y)
        y.backward(dy)
        yt.backward(dy)
        torch.testing.assert_close(xs.grad, xt.grad, **TOL32)
        for p, pt in ((ours.weight, bn.weight), (ours.bias, bn.bias)):
            torch.testing.assert_close(p.grad, pt.grad, **TOL32)
            p.grad = pt.grad = None


def renorm64(x, mu, sigma, weight, bias, eps, momentum, r_max, d_max):
    """Algorithm 1 of Ioffe (2017) in float64: (y, new mu, new sigma, whether r and d clipped)."""
    shape = (1, -1, 1, 1)
    mu_b = x.mean(dim=(0, 2, 3))
    sigma_b = torch.sqrt(((x - mu_b.reshape(shape)) ** 2).mean(dim=(0, 2, 3)) + eps)
    r_raw = (sigma_b / sigma).detach()
    d_raw = ((mu_b - mu) / sigma).detach()
    r = r_raw.clamp(1 / r_max, r_max)
    d = d_raw.clamp(-d_max, d_max)
    xhat = (x - mu_b.reshape(shape)) / sigma_b.reshape(shape) * r.reshape(shape) + d.reshape(shape)
    y = weight.reshape(shape) * xhat + bias.reshape(shape)
    mu = mu + momentum * (mu_b.detach() - mu)
    sigma = sigma + momentum * (sigma_b.detach() - sigma)
    clipped = bool((r != r_raw).any() and (d != d_raw).any())
    return y, mu, sigma, clipped


def test_batch_renorm_follows_algorithm_1():
    eps, momentum, r_max, d_max = 1e-3, 0.2, 1.5, 0.5
    ours = BatchRenorm2d(
        3,
        eps=eps,
        momentum=momentum,
        r_max=r_max,
        d_max=d_max,
        warmup_steps=0,
        ramp_steps=0,
        dtype=torch.float64,
    )
    randomize(ours)
    weight = ours.weight.detach().clone().requires_grad_(True)
    bias = ours.bias.detach().clone().requires_grad_(True)
    mu, sigma = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    # per-channel stats far from the running (0, 1), and moving, so the clips bind
    scale = torch.tensor([4.0, 0.2, 2.0], dtype=torch.float64).reshape(1, 3, 1, 1)
    shift = torch.tensor([3.0, -2.0, 0.5], dtype=torch.float64).reshape(1, 3, 1, 1)
    clipped_steps = 0
    for step in range(4):
        x = torch.randn(6, 3, 4, 4, dtype=torch.float64) * scale * (1 + step) + shift
        xs, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y = ours(xs)
        yr, mu, sigma, clipped = renorm64(xr, mu, sigma, weight, bias, eps, momentum, r_max, d_max)
        clipped_steps += clipped
        torch.testing.assert_close(y, yr)
        torch.testing.assert_close(ours.running_mean, mu)
        torch.testing.assert_close(ours.running_std, sigma)
        dy = torch.randn_like(y)
        y.backward(dy)
        yr.backward(dy)
        torch.testing.assert_close(xs.grad, xr.grad)
        torch.testing.assert_close(ours.weight.grad, weight.grad)
        torch.testing.assert_close(ours.bias.grad, bias.grad)
        for p in (ours.weight, ours.bias, weight, bias):
            p.grad = None
    assert clipped_steps >= 2
    assert int(ours.num_batches_tracked) == 4

    ours.eval()
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    expected = (x - mu.reshape(1, -1, 1, 1)) / sigma.reshape(1, -1, 1, 1)
    expected = expected * weight.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)
    torch.testing.assert_close(ours(x), expected.detach())
    assert int(ours.num_batches_tracked) == 4


def limits(layer, step=None):
    return tuple(float(v) for v in layer.renorm_limits(step))


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, (1.0, 0.0)),
        (9, (1.0, 0.0)),
        (10, (1.0, 0.0)),
        (15, (1.5, 1.25)),
        (20, (2.0, 2.5)),
        (30, (3.0, 5.0)),
        (1000, (3.0, 5.0)),
    ],
)
def test_batch_renorm_schedule(step, expected):
    layer = BatchRenorm(3, r_max=3.0, d_max=5.0, warmup_steps=10, ramp_steps=20)
    assert limits(layer, step) == pytest.approx(expected)


def test_batch_renorm_schedule_edges():
    assert limits(BatchRenorm(3, warmup_steps=0, ramp_steps=0), 0) == (3.0, 5.0)
    layer = BatchRenorm(3, warmup_steps=5, ramp_steps=0)
    assert limits(layer, 4) == (1.0, 0.0)
    assert limits(layer, 5) == (3.0, 5.0)
    assert limits(BatchRenorm(3, warmup_steps=0, ramp_steps=4), 1) == (1.5, 1.25)


def test_batch_renorm_schedule_counts_training_steps():
    layer = BatchRenorm2d(3, r_max=2.0, d_max=2.0, warmup_steps=2, ramp_steps=0)
    bn = nn.BatchNorm2d(3)
    for step in range(4):
        assert limits(layer) == ((1.0, 0.0) if step < 2 else (2.0, 2.0))
        x = torch.randn(4, 3, 3, 3) * 5 + 4
        y, yt = layer(x), bn(x)
        # during warm-up it is plain BatchNorm; after, the far-off running stats bind
        assert torch.allclose(y, yt, atol=1e-5) == (step < 2)
    layer.eval()
    layer(torch.randn(4, 3, 3, 3))
    assert int(layer.num_batches_tracked) == 4


def test_batch_renorm_one_value_per_channel_error_matches_torch():
    x = torch.randn(1, 3, 1, 1)
    with pytest.raises(ValueError) as expected:
        nn.BatchNorm2d(3)(x)
    with pytest.raises(ValueError, match=f"^{re.escape(str(expected.value))}$"):
        BatchRenorm2d(3)(x)
    with pytest.raises(ValueError, match=re.escape("expected 4D input (got 3D input)")):
        BatchRenorm2d(3)(torch.randn(4, 3, 5))


def test_batch_renorm_rejects_bad_limits():
    with pytest.raises(ValueError, match="r_max"):
        BatchRenorm(3, r_max=0.5)


# --- ghost_bn ----------------------------------------------------------------------------------


def assert_ghost_matches(ghost, bn, x, pieces):
    """``ghost(x)`` is ``bn`` on ``pieces`` of ``x`` in turn: outputs, grads, buffers."""
    xs, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = ghost(xs)
    yt = torch.cat([bn(part) for part in xt.split(pieces)])
    torch.testing.assert_close(y, yt, **TOL32)
    dy = torch.randn_like(y)
    y.backward(dy)
    yt.backward(dy)
    torch.testing.assert_close(xs.grad, xt.grad, **TOL32)
    torch.testing.assert_close(ghost.weight.grad, bn.weight.grad, **TOL32)
    torch.testing.assert_close(ghost.bias.grad, bn.bias.grad, **TOL32)
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(ghost.state_dict()[key], value, **TOL32, msg=key)


@pytest.mark.parametrize("n", [5, 8])
def test_ghost_bn_with_one_virtual_batch_is_batchnorm(n):
    ghost = randomize(GhostBatchNorm(3, virtual_batch_size=8))
    bn = nn.BatchNorm2d(3)
    bn.load_state_dict(ghost.state_dict())
    assert_ghost_matches(ghost, bn, torch.randn(n, 3, 4, 4) * 2 + 1, [n])


@pytest.mark.parametrize("n, pieces", [(8, [4, 4]), (11, [4, 4, 3])])
def test_ghost_bn_normalises_each_virtual_batch(n, pieces):
    ghost = randomize(GhostBatchNorm(3, virtual_batch_size=4))
    bn = nn.BatchNorm2d(3)
    bn.load_state_dict(ghost.state_dict())
    x = torch.randn(n, 3, 4, 4) * 2 + 1
    x[: n // 2] += 3  # the halves differ, so one batch's statistics would not do
    assert_ghost_matches(ghost, bn, x, pieces)

    ghost.eval()
    bn.eval()
    x = torch.randn(n, 3, 4, 4)
    torch.testing.assert_close(ghost(x), bn(x), **TOL32)


def test_ghost_bn_merges_a_last_virtual_batch_of_one_value():
    ghost = randomize(GhostBatchNorm(3, virtual_batch_size=4))
    bn = nn.BatchNorm1d(3)
    bn.load_state_dict(ghost.state_dict())
    assert_ghost_matches(ghost, bn, torch.randn(9, 3), [4, 5])


def test_ghost_bn_has_batchnorm_state_dict_keys():
    assert GhostBatchNorm(3).state_dict().keys() == nn.BatchNorm2d(3).state_dict().keys()
    assert math.isclose(GhostBatchNorm(3, momentum=0.3).momentum, 0.3)


DEGENERATE_BACKENDS = ["cpu", "reference"] + (
    ["triton"] if importlib.util.find_spec("triton") is not None else []
)


def _on(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", DEGENERATE_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (4, 3, 0, 4), (5, 3, 0, 0)])
@pytest.mark.parametrize("name", ["custom_bn", "ghost_bn", "batch_renorm"])
def test_an_empty_batch_leaves_the_running_statistics_as_torch_does(name, shape, backend):
    """torch's BatchNorm on an empty batch: empty output, zero gradients for weight and
    bias, running statistics unchanged, the batch counted. (Was NaN statistics.)"""
    device = _on(backend)
    ours = NormSpec(name, {"backend": backend})(3).to(device)
    theirs = torch.nn.BatchNorm2d(3).to(device)
    for module in (ours, theirs):
        module.running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = torch.randn(*shape, device=device, requires_grad=True)
    x_torch = x.detach().clone().requires_grad_()
    y, y_torch = ours(x), theirs(x_torch)
    y.sum().backward()
    y_torch.sum().backward()
    assert y.shape == y_torch.shape == x.shape
    assert x.grad.shape == x.shape
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
    after = ours.state_dict()
    for key, value in before.items():
        if key == "num_batches_tracked":
            assert after[key] == value + 1 == theirs.num_batches_tracked
        else:
            torch.testing.assert_close(after[key], value)  # unchanged, and not NaN


@pytest.mark.parametrize("backend", DEGENERATE_BACKENDS)
@pytest.mark.parametrize("cls", [BatchNorm1d, BatchNorm2d])
@pytest.mark.parametrize("training", [True, False])
def test_zero_channels_raise_as_torch_does_not_crash(cls, training, backend):
    """BatchNorm2d(0) killed the process with SIGFPE in the C++ kernel; torch raises."""
    shape = (4, 0) if cls is BatchNorm1d else (4, 0, 3, 3)
    ours = cls(0, backend=backend).train(training)
    theirs = getattr(torch.nn, cls.__name__)(0).train(training)
    with pytest.raises(IndexError):
        theirs(torch.randn(*shape))
    with pytest.raises(ValueError, match="at least one channel"):
        ours(torch.randn(*shape, device=_on(backend)))


def test_the_cpu_kernel_itself_refuses_zero_channels():
    from normbench.kernels import cpu

    ext = cpu.extension()
    if ext is None:
        pytest.skip("no compiler: the reference runs instead")
    with pytest.raises(ValueError, match="at least one channel"):
        ext.batch_norm_forward(torch.randn(4, 0, 3, 3), None, None, 1e-5)
    with pytest.raises(ValueError, match="at least one channel"):
        ext.batch_norm_eval(
            torch.randn(4, 0, 3, 3), torch.zeros(0), torch.ones(0), None, None, 1e-5
        )


# --- frn, rms, evonorm_s0 against float64 references written here ------------------------


def _reference(name: str, layer, x: torch.Tensor) -> torch.Tensor:
    """The paper's formula, one sample and channel (or group) at a time, in float64."""
    x = x.double()
    n, c = x.shape[:2]
    out = torch.empty_like(x)
    p = {k: v.detach().double() for k, v in layer.named_parameters()}
    for i in range(n):
        if name == "rms":
            rms = math.sqrt(float((x[i] ** 2).mean()) + layer.eps)
            for j in range(c):
                out[i, j] = x[i, j] / rms * p["weight"][j]
        elif name == "frn":
            for j in range(c):
                nu2 = float((x[i, j] ** 2).mean())
                y = p["weight"][j] * x[i, j] / math.sqrt(nu2 + layer.eps) + p["bias"][j]
                out[i, j] = torch.clamp(y, min=float(p["tau"][j]))
        else:  # evonorm_s0
            size = c // layer.num_groups
            for g in range(layer.num_groups):
                block = x[i, g * size : (g + 1) * size]
                mean = float(block.mean())
                var = float(((block - mean) ** 2).mean())
                for j in range(g * size, (g + 1) * size):
                    gate = x[i, j] / (1 + torch.exp(-p["v"][j] * x[i, j]))
                    out[i, j] = gate / math.sqrt(var + layer.eps) * p["weight"][j] + p["bias"][j]
    return out


FORMULA_CASES = [
    (name, kwargs, shape)
    for name, kwargs in [("frn", {}), ("rms", {}), ("evonorm_s0", {"groups": 5})]
    for shape in [(3, 12, 4, 5), (2, 12, 6), (5, 12)]
    if not (name == "frn" and len(shape) == 2)  # refused: tested with every variant
]


@pytest.mark.parametrize("name, kwargs, shape", FORMULA_CASES)
def test_new_variants_match_their_formula_in_float64(name, kwargs, shape):
    layer = randomize(get_norm(name)(12, **kwargs))
    x = torch.randn(shape) * 2 + 0.5
    expected = _reference(name, layer, x)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    if name == "evonorm_s0":
        assert layer.num_groups == 4  # the largest divisor of 12 at most 5, as group's


def test_variants_with_their_own_activation_get_no_second_one():
    from normbench.models import build_model

    for name, relus in [("frn", 0), ("evonorm_s0", 0), ("layer", 3), ("rms", 3)]:
        model = build_model("small_cnn", NormSpec(name), 1, 10, (8, 8))
        assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == relus, name
    resnet = build_model("resnet20", NormSpec("frn"), 3, 10, (8, 8))
    # the ReLU after each residual sum stays (functional); none follows an FRN layer
    assert not any(isinstance(m, nn.ReLU) for m in resnet.modules())
    out = resnet(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("name", norm_names())
def test_every_variant_passes_the_checks_users_run(name):
    """``normbench check-norm`` runs these on a user's class; normbench's own pass."""
    from normbench.checknorm import check_norm

    failed = [f"{c.name}: {c.detail}" for c in check_norm(get_norm(name)) if not c.passed]
    assert not failed, failed
