"""The checks every normalization variant must pass, runnable on a user's own class.

``normbench check-norm mypkg.MyNorm`` runs them before a sweep does: the class builds
from ``(num_channels)``, keeps shape and dtype in training and eval mode, on images
and (unless it needs spatial dimensions) on features, its state_dict loads into a new
instance that then computes the same, eval mode leaves its state alone, gradients
reach the input and every parameter, a layer that says it prefers channels_last
computes the same on it, and the models can use it. Each check reports
what failed, in words; tests/test_norms.py runs normbench's own variants through the
same checks.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from normbench.interrupts import Interrupted
from normbench.norms.registry import describe_error, error_text

CHANNELS = 12
IMAGES = (6, CHANNELS, 5, 5)
FEATURES = (6, CHANNELS)


@dataclass
class Check:
    name: str
    passed: bool
    detail: str = ""


def _tensors_equal(a: dict, b: dict) -> str | None:
    for key in a:
        if key not in b:
            return f"{key} is missing"
        if not torch.equal(a[key], b[key]):
            return f"{key} differs"
    return None


def _builds(cls) -> nn.Module:
    layer = cls(CHANNELS)
    if not isinstance(layer, nn.Module):
        raise AssertionError(
            f"{cls.__name__}({CHANNELS}) is a {type(layer).__name__}, not a Module"
        )
    return layer


def _dtype(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def output_problem(x, y) -> str | None:
    """What is wrong with ``y`` as a norm layer's output for input ``x`` (a tensor of
    ``x``'s shape, dtype and device), in words; None when nothing is."""
    if not isinstance(y, torch.Tensor):
        return f"{tuple(x.shape)} became a {type(y).__name__}, not a tensor"
    if y.shape != x.shape:
        return f"{tuple(x.shape)} became {tuple(y.shape)}"
    if y.dtype != x.dtype:
        return f"{_dtype(x.dtype)} input gave {_dtype(y.dtype)}"
    if y.device != x.device:
        return f"input on {x.device} gave an output on {y.device}"
    return None


def _forward(cls, shape) -> str:
    layer = _builds(cls)
    x = torch.randn(shape) * 3 + 1
    for training in (True, False):
        layer.train(training)
        y = layer(x)
        mode = "training" if training else "eval"
        problem = output_problem(x, y)
        if problem is not None:
            raise AssertionError(f"in {mode} mode {problem}")
        if not torch.isfinite(y).all():
            raise AssertionError(f"in {mode} mode the output has NaN or inf")
    return f"{tuple(shape)} in training and eval mode"


def _features(cls) -> str:
    if getattr(cls, "needs_spatial", False):
        layer = _builds(cls)
        try:
            layer(torch.randn(FEATURES))
        except ValueError:
            return "needs_spatial = True, and (N, C) input is refused with a ValueError"
        raise AssertionError("needs_spatial = True, but (N, C) input was not refused")
    return _forward(cls, FEATURES)


def _train_steps(layer: nn.Module, steps: int = 3) -> None:
    parameters = list(layer.parameters())
    optimizer = torch.optim.SGD(parameters, lr=0.1) if parameters else None
    layer.train()
    for _ in range(steps):
        y = layer(torch.randn(IMAGES) * 2 + 1)
        if optimizer is not None:
            optimizer.zero_grad()
            (y * torch.randn_like(y)).sum().backward()
            optimizer.step()


def _state_dict(cls) -> str:
    layer = _builds(cls)
    _train_steps(layer)
    fresh = _builds(cls)
    fresh.load_state_dict(layer.state_dict())
    layer.eval()
    fresh.eval()
    x = torch.randn(IMAGES)
    with torch.no_grad():
        if not torch.equal(layer(x), fresh(x)):
            raise AssertionError("a new instance with the loaded state_dict computes otherwise")
    return f"{len(layer.state_dict())} entries; the loaded copy computes the same"


def _eval_is_stateless(cls) -> str:
    layer = _builds(cls)
    _train_steps(layer)
    layer.eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        layer(torch.randn(IMAGES) * 5)
    problem = _tensors_equal(before, layer.state_dict())
    if problem:
        raise AssertionError(f"an eval-mode forward changed the state: {problem}")
    return "an eval-mode forward changes nothing"


def _gradients(cls) -> str:
    layer = _builds(cls)
    with torch.no_grad():  # off their initial values, so that every parameter acts
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1)
    layer.train()
    x = torch.randn(IMAGES, requires_grad=True)
    y = layer(x)
    (y * torch.randn_like(y)).sum().backward()
    if x.grad is None or not torch.isfinite(x.grad).all():
        raise AssertionError("no finite gradient reaches the input")
    for name, p in layer.named_parameters():
        if p.grad is None:
            raise AssertionError(f"parameter {name} gets no gradient")
        if not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0:
            raise AssertionError(f"parameter {name} gets a zero or non-finite gradient")
    return f"the input and {len(list(layer.parameters()))} parameters"


def _channels_last(cls) -> str:
    """A layer that says it prefers channels_last (``memory_format=auto`` then runs the
    models so) computes on channels_last input what it computes on contiguous input: the
    training output, the input's gradient, and the eval output after that step."""
    if not getattr(cls, "prefers_channels_last", False):
        return "not declared (prefers_channels_last): memory_format=auto keeps models contiguous"
    runs = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        layer = _builds(cls).double().train()
        torch.manual_seed(1)
        x = torch.randn(IMAGES, dtype=torch.float64) * 2 + 1
        # random, not a per-channel constant, which has no gradient through a BatchNorm
        dy = torch.randn(IMAGES, dtype=torch.float64)
        x = x.contiguous(memory_format=fmt).requires_grad_()
        y = layer(x)
        y.backward(dy.contiguous(memory_format=fmt))
        with torch.no_grad():
            runs.append((y.detach(), x.grad, layer.eval()(x)))
    for what, first, last in zip(("output", "input's gradient", "eval output"), *runs, strict=True):
        if not torch.allclose(last, first, rtol=1e-9, atol=1e-12):
            raise AssertionError(f"on channels_last input the {what} differs from contiguous's")
    return "channels_last input: the same outputs and gradient (float64)"


def _models(cls) -> str:
    from normbench.models import build_model
    from normbench.norms.registry import NormSpec

    target = f"{cls.__module__}.{cls.__qualname__}"
    spec = NormSpec(getattr(cls, "registry_name", cls.__name__), target=target)
    model = build_model("small_cnn", spec, 1, 10, (8, 8))
    out = model(torch.randn(4, 1, 8, 8))
    out.sum().backward()
    relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
    return f"small_cnn trains one step ({relus} ReLUs after it)"


CHECKS: tuple[tuple[str, Callable], ...] = (
    ("builds from (num_channels)", lambda cls: f"{type(_builds(cls)).__name__}({CHANNELS})"),
    ("images (N, C, H, W)", lambda cls: _forward(cls, IMAGES)),
    ("features (N, C)", _features),
    ("state_dict round trip", _state_dict),
    ("eval mode keeps the state", _eval_is_stateless),
    ("gradients", _gradients),
    ("channels_last", _channels_last),
    ("in a model", _models),
)


def check_norm(cls) -> list[Check]:
    """Every check on ``cls``: which passed, and what failed and how."""
    torch.manual_seed(0)
    results = []
    for name, run in CHECKS:
        try:
            results.append(Check(name, True, run(cls)))
        except (KeyboardInterrupt, Interrupted):
            raise
        except BaseException as err:  # the user's class may fail in any way (exit too): say how
            where = traceback.extract_tb(err.__traceback__)[-1]
            if isinstance(err, SystemExit):  # its message is its exit code, if any
                detail = describe_error(err)
            else:  # its message made safely: the class's own __str__ may raise
                detail = f"{type(err).__name__}: {error_text(err)}"
            if not isinstance(err, AssertionError):
                detail += f" (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})"
            results.append(Check(name, False, " ".join(detail.split())))
    return results
