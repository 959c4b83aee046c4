"""Fuzz cases for normbench's BatchNorm: random arguments through every entry point, each
call compared with torch (or float64 math written here) or expected to fail cleanly.

A case is drawn from ``(seed, index)`` alone, so any case can be run again by its number.
It picks an entry point (``normbench.kernels.batch_norm``, ``batch_norm_train``,
``batch_norm_stats``, ``batch_norm_tracked``, the ``BatchNorm1d/2d/3d`` and
``BatchRenorm2d`` modules, or one of the ``torch.ops.normbench`` operators), an input
(shapes with empty and one-value dimensions; contiguous, channels_last, permuted, sliced or
expanded; float16, bfloat16, float32, float64, or a dtype nothing computes in; infinite or
NaN values), and each other argument's presence, shape ((C,), (1, C), (C, 1), the wrong
number of values), strides, dtype, device (the CPU, or meta) and requires_grad.

The oracle is torch: the same call on torch's ``F.batch_norm`` (or ``torch.batch_norm``
for the operators, its checks below the Python ones; ``torch.nn.BatchNorm*d`` for the
modules). Where torch raises, normbench must raise the same exception type, with torch's
message where normbench words it as torch does; where torch computes, normbench must
compute the same as torch does on the arguments in float64 (outputs, running statistics,
the batch counter, gradients of every leaf). The backward and update operators, which
torch has no counterpart for, are checked against their contract written here. Known,
intended differences are listed in ``DIFFERENCES``.

Run by tests/test_kernel_fuzz.py in subprocesses, and by hand (seeded; prints each failing
case with its arguments)::

    python tests/kernel_fuzz.py --seed 1 --first 0 --last 400      # report per case (JSON)
    python tests/kernel_fuzz.py --seed 1 --first 41 --last 41 --show  # one case, its arguments
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import traceback

import torch
import torch.nn.functional as F

DTYPES = {
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f32": torch.float32,
    "f64": torch.float64,
    "i64": torch.int64,
    "i32": torch.int32,
    "bool": torch.bool,
    "c64": torch.complex64,
}
FLOATS = ("f16", "bf16", "f32", "f64")

#: Tolerances (relative and absolute, the absolute one scaled by the reference's largest
#: magnitude) of outputs and of gradients, by the input's dtype.
TOLERANCE = {"f64": 1e-7, "f32": 1e-4, "f16": 2e-2, "bf16": 6e-2}
GRAD_FACTOR = 10.0

#: torch's messages that normbench words exactly as torch (where torch's message has one
#: of these, normbench's must be the same); others are compared by exception type only.
#: A call with several faults may name another of them first (both messages are then of
#: different kinds): its exception type must still be torch's.
SAME_WORDING = (
    "should contain",
    "expected scalar type",
    "mixed dtype (CPU)",
    "is not on the expected device",
    "is not differentiable with respect to argument",
    "Expected more than 1 value per channel",
    "eps must be",
    "not implemented for",
    "must either both be None",
    "must be defined in evaluation mode",
)
#: Names in torch's messages that normbench's give as its own.
RENAMED = {"'native_batch_norm'": "'batch_norm'"}

#: Where normbench departs from torch on purpose (docs/kernel.md#every-argument-checked says
#: so), each a test of the case, of normbench's error (None: it computed) and of torch's:
#: - a running statistic written in training that is expanded (several channels in one memory
#:   location) is refused, where torch writes its channels over each other;
#: - torch's CPU kernel has a second path for non-contiguous arguments, which takes what its
#:   first refuses (mixed dtypes, running statistics of 2 dimensions, even a complex input):
#:   normbench holds every layout to the first path's rules;
#: - torch refuses an input of a dtype it does not compute in at several points, with several
#:   exception types (NotImplementedError, or a RuntimeError of mean() or of a bool
#:   subtraction), after or before its other checks: normbench refuses it, cleanly, in its
#:   own order;
#: - torch's meta kernels take an input of any dtype, and a 1-d input: normbench's refuse
#:   what its CPU kernel would (a meta input stands for a CPU or CUDA one; torch's CPU
#:   kernel raises the same IndexError for a 1-d input).
DIFFERENCES = {
    "expanded running statistics": lambda case, ours, theirs: (
        isinstance(ours, RuntimeError)
        and "refers to a single memory location" in str(ours)
        and (case["training"] or case["api"] in ("tracked", "op_update"))
        and any(
            case[k] is not None and case[k]["stride"] == "expanded"
            for k in ("running_mean", "running_var")
        )
    ),
    "torch's path for non-contiguous arguments": lambda case, ours, theirs: (
        (theirs is None or _torch_bug(theirs) or _dtype_error(theirs))
        and isinstance(ours, RuntimeError)
        and any(p in str(ours) for p in ("expected scalar type", "mixed dtype", "to have 1 dims"))
        and (
            case["x"]["layout"] in ("permuted", "sliced", "expanded")
            or any(
                case[k] is not None and case[k]["stride"] != "contiguous"
                for k in ("weight", "bias", "running_mean", "running_var")
            )
        )
    ),
    "torch's meta kernel on an input of any dtype": lambda case, ours, theirs: (
        isinstance(ours, NotImplementedError)
        and case["x"]["device"] == "meta"
        and case["x"]["dtype"] not in FLOATS
    ),
    "torch's meta kernel on a 1-d input": lambda case, ours, theirs: (
        isinstance(ours, IndexError)
        and "Dimension out of range" in str(ours)
        and case["x"]["device"] == "meta"
        and len(case["x"]["shape"]) == 1
    ),
    "torch's errors for an integer input": lambda case, ours, theirs: (
        isinstance(ours, (RuntimeError, NotImplementedError, IndexError, ValueError))
        and theirs is not None
        and case["x"]["dtype"] not in FLOATS
    ),
}

#: With ``--triton``: statistics where the Triton kernels give NaN for torch's infinity (a
#: channel with an infinite value: Welford's running mean turns inf - inf into NaN; the
#: output is NaN either way, as torch's).
LOOSE_INFINITY: set[str] = set()

ENTRY_POINTS = (
    ["functional"] * 6
    + ["train", "stats", "tracked", "tracked"]
    + ["module"] * 4
    + ["renorm"]
    + ["op_forward", "op_eval", "op_stats"]
    + ["op_backward"] * 3
    + ["op_update"] * 3
)


# ------------------------------------------------------------------------------ drawing cases


def _per_channel_spec(rng: random.Random, kind: str, x_dtype: str) -> dict | None:
    """One per-channel argument (weight, bias, running_mean, running_var): mostly right."""
    floating = x_dtype if x_dtype in FLOATS else "f32"
    reduced = floating in ("f16", "bf16")
    spec = {
        "shape": rng.choices(
            ["C", "1C", "C1", "1C1", "scalar", "C+1", "1", "2C"],
            weights=[70, 8, 4, 2, 2, 3, 3, 2],
        )[0],
        "stride": rng.choices(["contiguous", "sliced", "expanded", "transposed"], [80, 9, 6, 5])[0],
        # x's dtype, float32 with half-precision x (torch's mixed precision), or another
        "dtype": rng.choices(
            [floating, "f32" if reduced else floating, rng.choice(FLOATS), "i64"],
            weights=[75, 12, 10, 3],
        )[0],
        "device": "meta" if rng.random() < 0.02 else "cpu",
        "requires_grad": rng.random() < (0.6 if kind in ("weight", "bias") else 0.03),
        "values": "positive" if kind == "running_var" else "normal",
    }
    if kind == "running_var" and rng.random() < 0.05:
        spec["values"] = rng.choice(["zero", "negative"])
    return spec


def draw(seed: int, index: int) -> dict:
    """Case ``index`` of ``seed``: a JSON-able description of every argument."""
    rng = random.Random(f"{seed}:{index}")
    api = rng.choice(ENTRY_POINTS)
    dims = rng.choices([1, 2, 3, 4, 5], weights=[2, 30, 20, 38, 10])[0]
    if api in ("renorm",):
        dims = 4 if rng.random() < 0.9 else rng.choice([2, 3, 5])
    channels = rng.choices([1, 2, 3, 5, 8, 16, 17, 33, 4096], [10, 10, 15, 15, 10, 15, 10, 10, 5])[
        0
    ]
    batch = rng.choices([0, 1, 2, 3, 4, 8], weights=[4, 8, 20, 20, 20, 28])[0]
    spatial_sizes = [rng.choices([0, 1, 2, 3, 5, 7], [2, 15, 25, 25, 20, 13])[0] for _ in range(3)]
    shape = [batch, channels, *spatial_sizes[: max(0, dims - 2)]][:dims]
    if channels == 4096:  # keep a case small: wide channels with few values each
        shape = [min(batch, 8), channels, *[1] * max(0, dims - 2)][:dims]
    x_dtype = rng.choices(list(DTYPES), weights=[12, 12, 45, 20, 3, 2, 2, 1])[0]
    layout = rng.choices(
        ["contiguous", "channels_last", "permuted", "sliced", "expanded"], [50, 15, 15, 12, 8]
    )[0]
    if layout == "channels_last" and dims not in (4, 5):
        layout = "contiguous"
    case = {
        "seed": seed,
        "index": index,
        "api": api,
        "x": {
            "shape": shape,
            "dtype": x_dtype,
            "layout": layout,
            "device": "meta" if rng.random() < 0.02 else "cpu",
            "requires_grad": rng.random() < 0.7,
            "scale": rng.choice([1.0, 3.0]),
            "offset": rng.choice([0.0, 0.0, 5.0]),
            "special": rng.choices([None, "inf", "-inf", "nan"], [90, 4, 3, 3])[0],
        },
        "training": rng.random() < 0.65,
        "momentum": rng.choice([0.1, 0.1, 0.0, 1.0, 0.5, None]),
        "eps": rng.choices([1e-5, 1e-3, 0.0, -1.0], [70, 15, 10, 5])[0],
        "relu": rng.random() < 0.2,
        "values_seed": rng.randrange(2**31),
        "affine": rng.random() < 0.8,
        "track": rng.random() < 0.8,
    }
    for kind in ("weight", "bias", "running_mean", "running_var"):
        present = rng.random() < (0.75 if kind in ("weight", "bias") else 0.7)
        case[kind] = _per_channel_spec(rng, kind, x_dtype) if present else None
    if rng.random() < 0.04:  # one running statistic without the other
        case[rng.choice(["running_mean", "running_var"])] = None
    case["counter"] = rng.choices(["long", "none", "float", "two"], [85, 5, 5, 5])[0]
    if api == "op_backward":
        case["grad_out"] = rng.choices(
            ["same", "smaller", "other shape", "other dtype", "meta", "channels_last"],
            [70, 7, 7, 7, 2, 7],
        )[0]
        case["stats"] = rng.choices(["batch", "random", "wrong size", "int"], [70, 20, 5, 5])[0]
    if api == "op_update":
        case["count"] = rng.choice([0, 1, 2, 17, 1000])
        case["cumulative"] = rng.random() < 0.3
        case["stats"] = rng.choices(["batch", "random", "wrong size", "int"], [75, 15, 5, 5])[0]
    if api == "module" and case["relu"] and dims == 4 and rng.random() < 0.6:
        # the layer with the pooling fused in (_module): mostly the layout its operators read
        case["x"]["layout"] = "channels_last"
    return case


# ------------------------------------------------------------------------------ building tensors


class Builder:
    """The case's tensors, from its ``values_seed`` (the same tensors every time)."""

    def __init__(self, case: dict):
        self.case = case
        self.gen = torch.Generator().manual_seed(case["values_seed"])

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64)

    def x(self) -> torch.Tensor:
        spec = self.case["x"]
        shape, layout = spec["shape"], spec["layout"]
        values = self.randn(*shape) * spec["scale"] + spec["offset"]
        if spec["special"] is not None and values.numel() > 0:
            flat = values.view(-1)
            flat[int(torch.randint(values.numel(), (1,), generator=self.gen))] = float(
                spec["special"]
            )
        x = _cast(values, spec["dtype"])
        if layout == "channels_last":
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            x = x.contiguous(memory_format=fmt)
        elif layout == "permuted" and x.dim() >= 2:
            order = list(range(x.dim()))[::-1]
            x = x.permute(order).contiguous().permute(order)  # same values, reversed strides
        elif layout == "sliced" and x.dim() >= 1:
            wide = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=x.dtype)
            wide[..., ::2] = x
            x = wide[..., ::2]
        elif layout == "expanded" and x.dim() >= 2 and shape[0] > 0:
            x = x[:1].expand(*shape)  # stride 0 along the batch
        return x.to(spec["device"])

    def per_channel(self, kind: str) -> torch.Tensor | None:
        spec = self.case[kind]
        if spec is None:
            return None
        channels = self.case["x"]["shape"][1] if len(self.case["x"]["shape"]) > 1 else 1
        shape = {
            "C": (channels,),
            "1C": (1, channels),
            "C1": (channels, 1),
            "1C1": (1, channels, 1),
            "scalar": () if channels == 1 else (channels + 1,),
            "C+1": (channels + 1,),
            "1": (1,),
            "2C": (2 * channels,),
        }[spec["shape"]]
        numel = math.prod(shape)
        values = {
            "normal": lambda: self.randn(numel),
            "positive": lambda: self.randn(numel).abs() + 0.5,
            "zero": lambda: torch.zeros(numel, dtype=torch.float64),
            "negative": lambda: -self.randn(numel).abs() - 0.5,
        }[spec["values"]]().reshape(shape)
        t = _cast(values, spec["dtype"])
        stride = spec["stride"]
        if stride == "sliced" and t.dim() >= 1:
            wide = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=t.dtype)
            wide[..., ::2] = t
            t = wide[..., ::2]
        elif stride == "expanded" and t.dim() >= 1 and numel > 1:
            t = t.reshape(-1)[:1].expand(numel).reshape(shape)  # every value the first
        elif stride == "transposed" and t.dim() == 2:
            t = t.t().contiguous().t()
        t = t.to(spec["device"])
        if spec["requires_grad"] and t.is_floating_point():
            t = t.detach().requires_grad_(True)
        return t

    def counter(self) -> torch.Tensor | None:
        kind = self.case["counter"]
        return {
            "long": lambda: torch.tensor(3, dtype=torch.long),
            "none": lambda: None,
            "float": lambda: torch.tensor(3.0),
            "two": lambda: torch.tensor([3, 3], dtype=torch.long),
        }[kind]()


def _cast(values: torch.Tensor, name: str) -> torch.Tensor:
    dtype = DTYPES[name]
    if dtype == torch.bool:
        return values > 0
    if not dtype.is_floating_point and not dtype.is_complex:
        return values.round().to(dtype)
    return values.to(dtype)


def float64(t: torch.Tensor | None, leaf: bool = True, flat: bool = False):
    """``t``'s values in float64 (on the CPU, or meta where it is), shape kept or ``flat``
    (C,) (a leaf where ``t`` requires grad)."""
    if t is None:
        return None
    device = "meta" if t.device.type == "meta" else "cpu"
    # contiguous: torch's backward is wrong for some strides (N and C both of stride 1)
    out = t.detach().to(device, torch.float64).contiguous().clone()
    if flat:
        out = out.reshape(-1).clone()
    return out.requires_grad_(True) if leaf and t.requires_grad else out


def repaired(t: torch.Tensor | None, flat: bool = False):
    """``t`` as torch computes right: contiguous (and a weight or bias ``flat``, (C,)), its
    dtype kept (a leaf where ``t`` requires grad): torch's precision in the case's dtypes."""
    if t is None:
        return None
    out = t.detach().contiguous().clone()
    if flat:
        out = out.reshape(-1).clone()
    return out.requires_grad_(True) if t.requires_grad else out


def param64(t: torch.Tensor | None):
    """A weight or bias for the float64 reference: (C,), as every torch takes it (torch's
    backward fails on the (1, C) bias its forward takes; its forward on a strided (C, 1))."""
    return float64(t, flat=True)


def clone(t: torch.Tensor | None) -> torch.Tensor | None:
    """A copy of ``t`` with its dtype, device, shape, strides (zero strides too) and
    requires_grad: what normbench gets, while torch gets ``t``'s other copy."""
    if t is None:
        return None
    if t.device.type == "meta":
        out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    elif t.numel() > 1 and 0 in t.stride():
        # an expanded tensor: its base (one value along each expanded dimension), expanded
        index = tuple(slice(0, 1) if s == 0 else slice(None) for s in t.stride())
        out = t.detach()[index].clone().expand(t.shape)
    else:
        out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
        out.copy_(t.detach())
    return out.requires_grad_(t.requires_grad)


# ------------------------------------------------------------------------------ comparing


class Mismatch(AssertionError):
    pass


def close(name: str, ours, theirs, dtype: str, grad: bool = False, peer=None) -> None:
    """``ours`` (any dtype) equals ``theirs`` (float64) within the case's tolerance, widened
    to four times ``peer``'s distance from ``theirs`` where given (torch's result in the
    case's dtypes: the precision those dtypes allow, as on a channel of nearly equal values):
    same shape, NaN where NaN, infinities where infinite."""
    if ours is None or theirs is None:
        if (ours is None) != (theirs is None):
            raise Mismatch(f"{name}: ours {_desc(ours)}, torch's {_desc(theirs)}")
        return
    if tuple(ours.shape) != tuple(theirs.shape):
        raise Mismatch(f"{name}: shape {tuple(ours.shape)}, torch's {tuple(theirs.shape)}")
    if ours.device.type == "meta" or theirs.device.type == "meta":
        return
    tol = TOLERANCE.get(dtype, 1e-4) * (GRAD_FACTOR if grad else 1.0)
    a, b = ours.detach().double().cpu(), theirs.detach().double().cpu()
    if name in LOOSE_INFINITY:
        a = torch.where(a.isnan() & b.isinf(), b, a)
    if not torch.equal(a.isnan(), b.isnan()):
        raise Mismatch(f"{name}: NaN at {_where(a.isnan() != b.isnan())}")
    finite = b.isfinite() & a.isfinite()
    if not torch.equal(a.isinf(), b.isinf()) or not torch.equal(a[a.isinf()], b[b.isinf()]):
        raise Mismatch(f"{name}: infinities differ at {_where(a.isinf() != b.isinf())}")
    if finite.any():
        scale = max(1.0, float(b[finite].abs().max()))
        diff = (a[finite] - b[finite]).abs()
        bound = tol * scale + tol * b[finite].abs()
        usable = peer is not None and peer.device.type != "meta" and peer.shape == theirs.shape
        if usable:
            spread = (peer.detach().double().cpu() - b).abs()[finite]
            bound = bound + 4 * torch.nan_to_num(spread, nan=0.0, posinf=0.0)
        if bool((diff > bound).any()):
            raise Mismatch(f"{name}: off by up to {float(diff.max()):.3g} (tolerance {tol:g})")


def _desc(t) -> str:
    return "None" if t is None else f"{tuple(t.shape)} {t.dtype}"


def _where(mask: torch.Tensor) -> str:
    return str(mask.nonzero()[:3].tolist())


def error(fn):
    """``(None, result)`` or ``(exception, None)``."""
    try:
        return None, fn()
    except Exception as err:  # the oracle's and ours: compared, not hidden
        return err, None


def same_failure(ours: Exception | None, theirs: Exception, what: str) -> None:
    """Both raised: the same type, and torch's words where normbench uses them."""
    if ours is None:
        raise Mismatch(f"{what}: torch raised {_exc(theirs)}, normbench did not")
    if type(ours) is not type(theirs):
        raise Mismatch(f"{what}: normbench raised {_exc(ours)}, torch {_exc(theirs)}")
    message = str(theirs)
    for torch_name, name in RENAMED.items():
        message = message.replace(torch_name, name)
    for phrase in SAME_WORDING:
        if phrase in message and phrase in str(ours) and str(ours) != message:
            if phrase in ("should contain", "expected scalar type"):
                continue  # several arguments of a wrong size or dtype: another named first
            raise Mismatch(f"{what}: normbench said {_exc(ours)}, torch {_exc(theirs)}")


def _exc(err: BaseException) -> str:
    lines = str(err).strip().splitlines() or [""]
    return f"{type(err).__name__}: {lines[0][:200]}"


def _empty(case: dict) -> bool:
    return math.prod(case["x"]["shape"]) == 0


def _torch_bug(err: Exception) -> bool:
    # torch's own internal assertions (a strided (C, 1) weight): a bug of torch's, not a
    # refusal; normbench computes these, and is checked against torch on a copy
    return "INTERNAL ASSERT FAILED" in str(err)


def _dtype_error(err: Exception) -> bool:
    return isinstance(err, RuntimeError) and any(
        phrase in str(err) for phrase in ("expected scalar type", "mixed dtype")
    )


def _known_difference(case: dict, ours: Exception | None, theirs: Exception | None) -> bool:
    return any(test(case, ours, theirs) for test in DIFFERENCES.values())


# ------------------------------------------------------------------------------ running a case


def run(case: dict) -> None:
    """Runs one case; raises Mismatch (or any other exception: a failure too) when normbench
    and its oracle disagree."""
    runner = {
        "functional": _functional,
        "train": _functional,
        "stats": _functional,
        "tracked": _functional,
        "module": _module,
        "renorm": _renorm,
        "op_forward": _op_forward,
        "op_eval": _op_eval,
        "op_stats": _op_stats,
        "op_backward": _op_backward,
        "op_update": _op_update,
    }[case["api"]]
    torch.manual_seed(case["values_seed"])
    runner(case)


def _dtype(case: dict) -> str:
    return case["x"]["dtype"] if case["x"]["dtype"] in FLOATS else "f32"


def _args(case: dict):
    b = Builder(case)
    return (
        b.x(),
        b.per_channel("weight"),
        b.per_channel("bias"),
        b.per_channel("running_mean"),
        b.per_channel("running_var"),
        b.counter(),
    )


def _outcome(case, ours_fn, torch_fn, torch64_fn, compare, peer_fn=lambda: None) -> None:
    """The comparison every entry point makes: torch's outcome on the same arguments decides
    what normbench must do; ``compare(ours, theirs64, peer)`` checks the values against
    torch's in float64. ``peer_fn``: torch on the arguments repaired (:func:`repaired`) in
    the case's dtypes, whose distance from the float64 values is a precision normbench may
    have too."""
    theirs_err, theirs = error(torch_fn)
    ours_err, ours = error(ours_fn)
    if case["api"].startswith("op_") and _empty(case):
        # torch.batch_norm checks nothing on an empty input (and multiplies by weight[0]);
        # the operators check as ever
        if ours_err is not None and not isinstance(
            ours_err, (RuntimeError, NotImplementedError, IndexError)
        ):
            raise Mismatch(f"{case['api']}: an unclean error {_exc(ours_err)}")
        return
    if _known_difference(case, ours_err, theirs_err):
        return
    if theirs_err is not None and not _torch_bug(theirs_err):
        same_failure(ours_err, theirs_err, case["api"])
        return
    if ours_err is not None:
        raise Mismatch(f"{case['api']}: torch computed it, normbench raised {_exc(ours_err)}")
    if _empty(case):  # no values: the output's shape and dtype, as torch's empty batch gives
        if case["api"] == "stats":
            return  # statistics of nothing, where torch gives an empty output
        mine, torchs = _first(ours), _first(theirs)
        if torchs is not None and (mine.shape != torchs.shape or mine.dtype != torchs.dtype):
            raise Mismatch(f"empty batch: y {_desc(mine)}, torch's {_desc(torchs)}")
        return
    err64, theirs64 = error(torch64_fn)
    if err64 is not None:
        raise Mismatch(f"the float64 reference failed: {_exc(err64)}")
    _, peer = error(peer_fn)
    compare(ours, theirs64, peer)


def _first(result):
    return result[0] if isinstance(result, tuple) else result


def _grads(case, leaves, leaves64, dtype, names, peers=None) -> None:
    """Each leaf's gradient: its own shape and dtype, the float64 reference's values (whose
    weight and bias are (C,)); ``peers``: torch's leaves in the case's dtypes."""
    peers = peers or [None] * len(leaves)
    for name, ours, theirs, peer in zip(names, leaves, leaves64, peers, strict=True):
        if ours is None or not ours.requires_grad or ours.device.type == "meta":
            continue
        grad, expected = ours.grad, theirs.grad
        if grad is not None and (grad.shape != ours.shape or grad.dtype != ours.dtype):
            raise Mismatch(f"{name}.grad is {_desc(grad)}, the tensor {_desc(ours)}")
        if grad is not None and expected is not None:
            expected = expected.reshape(grad.shape)
        peer_grad = getattr(peer, "grad", None)
        close(f"{name}.grad", grad, expected, dtype, grad=True, peer=peer_grad)


def _backward(y, y64, seed: int, peer=None) -> None:
    """The same upstream gradient through normbench's output, the float64 reference's, and
    torch's in the case's dtypes (``peer``, where its backward works: not for a (1, C) bias)."""
    if not (y.requires_grad and y64.requires_grad) or y.device.type == "meta":
        return
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    y.backward(dy.to(y.dtype))
    y64.backward(dy)
    if peer is not None and peer.requires_grad:
        error(lambda: peer.backward(dy.to(peer.dtype)))


def _functional(case: dict) -> None:
    from normbench.kernels import batch_norm, batch_norm_stats, batch_norm_tracked, batch_norm_train

    x, w, b, rm, rv, counter = _args(case)
    api, training, eps = case["api"], case["training"], case["eps"]
    momentum = case["momentum"]
    relu = case["relu"]
    if api in ("train", "stats"):
        rm = rv = None
        training = True
    if api == "tracked":
        training = True
    if api == "stats":
        w = b = None
        relu = False
    if not (x.is_floating_point() and case["x"]["requires_grad"]) or api == "stats":
        x_leaf = x
    else:
        x_leaf = x.detach().requires_grad_(True)
    ours_args = [clone(t) for t in (x_leaf, w, b, rm, rv, counter)]
    theirs_args = [clone(t) for t in (x_leaf, w, b, rm, rv, counter)]
    args64 = [float64(x_leaf), param64(w), param64(b), float64(rm), float64(rv)]
    peer_args = [repaired(x_leaf), repaired(w, True), repaired(b, True), repaired(rm)]
    peer_args += [repaired(rv), clone(counter)]
    counter64 = clone(counter)
    dtype = _dtype(case)

    def act(y, relu=relu):
        return torch.relu(y) if relu else y

    def torch_call(x, w, b, rm, rv, counter):
        if api == "tracked":
            return _torch_tracked(x, rm, rv, counter, w, b, momentum, eps, relu)
        if api == "stats":
            return F.batch_norm(x, None, None, training=True, eps=eps)
        return act(F.batch_norm(x, rm, rv, w, b, training, _momentum(momentum), eps))

    def ours_call():
        x_, w_, b_, rm_, rv_, counter_ = ours_args
        if api == "functional":
            return batch_norm(x_, rm_, rv_, w_, b_, training, _momentum(momentum), eps, relu=relu)
        if api == "train":
            return batch_norm_train(x_, w_, b_, eps, relu=relu)
        if api == "stats":
            return batch_norm_stats(x_, eps)
        return batch_norm_tracked(x_, rm_, rv_, counter_, w_, b_, momentum, eps, relu=relu)

    def torch64():
        return torch_call(*args64, counter64)

    def compare(ours, theirs64, peer):
        if api == "stats":
            mean, invstd = ours
            x64 = args64[0]
            dims = [0, *range(2, x64.dim())]
            close("mean", mean, x64.mean(dims), dtype)
            close("invstd", invstd, (x64.var(dims, unbiased=False) + eps).rsqrt(), dtype)
            return
        y = ours[0] if api == "train" else ours
        if api == "train":
            x64 = args64[0].detach()
            dims = [0, *range(2, x64.dim())]
            if x64.numel() > 0:
                close("mean", ours[1], x64.mean(dims), dtype)
                close("invstd", ours[2], (x64.var(dims, unbiased=False) + eps).rsqrt(), dtype)
        if peer is not None and y.dtype != peer.dtype:
            raise Mismatch(f"y is {y.dtype}, torch's {peer.dtype}")
        close("y", y, theirs64, dtype, peer=peer)
        close("running_mean", ours_args[3], args64[3], dtype, peer=peer_args[3])
        close("running_var", ours_args[4], args64[4], dtype, peer=peer_args[4])
        _backward(y, theirs64, case["values_seed"], peer=peer)
        names = ("x", "weight", "bias")
        _grads(case, ours_args[:3], args64[:3], dtype, names, peers=peer_args[:3])

    _outcome(
        case, ours_call, lambda: torch_call(*theirs_args), torch64, compare,
        lambda: torch_call(*peer_args),
    )  # fmt: skip
    if api == "tracked" and counter is not None:
        # counted as torch's module counts it, whether the call succeeded or not
        close("num_batches_tracked", ours_args[5], theirs_args[5], "f64")


def _momentum(momentum):
    return 0.1 if momentum is None else momentum


def _torch_tracked(x, rm, rv, counter, w, b, momentum, eps, relu):
    """torch's ``_BatchNorm.forward`` in training with tracked statistics."""
    factor = 0.0 if momentum is None else momentum
    if counter is not None:
        counter.add_(1)
        if momentum is None:
            factor = 1.0 / float(counter)
    y = F.batch_norm(x, rm, rv, w, b, True, factor, eps)
    return torch.relu(y) if relu else y


class _TorchPooled(torch.nn.BatchNorm2d):
    """torch's BatchNorm2d, then ReLU and a 2x2 max-pooling: what normbench's BatchNorm2d
    with ``relu=True, pool=True`` computes (its buffers where the module's are)."""

    def forward(self, input):
        try:
            y = super().forward(input)
        except RuntimeError as err:
            if _torch_bug(err) and input.dim() == 4 and min(input.shape[2:]) < 2:
                # torch's BatchNorm2d trips an assertion of its own (after counting the
                # batch) where the pooling would refuse the planes under 2x2 anyway
                F.max_pool2d(input.detach(), 2)
            raise
        return F.max_pool2d(torch.relu(y), 2)


def _module(case: dict) -> None:
    """``BatchNorm1d/2d/3d`` (by the input's dimensions) against torch's, with the case's
    weight and bias (any shape, dtype or device) put in place of the module's; a 4-d
    case with ``relu`` is the layer with the ReLU and the 2x2 max-pooling fused in
    (``relu=True, pool=True``) against torch's three in a row."""
    import torch.nn as nn

    from normbench import norms

    x, w, b, _, _, _ = _args(case)
    name = {2: "BatchNorm1d", 3: "BatchNorm1d", 5: "BatchNorm3d"}.get(x.dim(), "BatchNorm2d")
    pooled = case["relu"] and x.dim() == 4
    channels = _channels(x)
    kwargs = {
        "eps": max(case["eps"], 1e-5),
        "momentum": case["momentum"],
        "affine": case["affine"],
        "track_running_stats": case["track"],
    }

    def torch_class():
        return _TorchPooled if pooled else getattr(nn, name)

    def make(cls, double: bool = False, flat: bool = False):
        extra = {"relu": True, "pool": True} if pooled and cls is getattr(norms, name) else {}
        m = cls(channels, **kwargs, **extra).train(case["training"])
        if m.running_mean is not None:  # running statistics away from 0 and 1
            gen = torch.Generator().manual_seed(case["values_seed"])
            m.running_mean.copy_(torch.randn(channels, generator=gen))
            m.running_var.copy_(torch.rand(channels, generator=gen) + 0.5)
        if x.dtype == torch.float64:
            m.double()
        if case["affine"]:
            for kind, t in (("weight", w), ("bias", b)):
                if t is not None:
                    value = float64(t, leaf=False, flat=True) if double else t.detach().clone()
                    value = value.reshape(-1).clone() if flat else value
                    grad = t.requires_grad and value.is_floating_point()
                    setattr(m, kind, nn.Parameter(value, requires_grad=grad))
        return m.double() if double else m

    ours_m, theirs_m = make(getattr(norms, name)), make(torch_class())
    theirs64 = make(torch_class(), double=True)
    peer_m = make(torch_class(), flat=True)
    x_leaf = x.detach().requires_grad_(True) if x.is_floating_point() else x
    x_ours, x_theirs, x64 = clone(x_leaf), clone(x_leaf), float64(x_leaf)
    x_peer = repaired(x_leaf)
    dtype = _dtype(case)

    def compare(y, y64, peer):
        if peer is not None and y.dtype != peer.dtype:
            raise Mismatch(f"y is {y.dtype}, torch's {peer.dtype}")
        close("y", y, y64, dtype, peer=peer)
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            mine, torchs = getattr(ours_m, buffer), getattr(theirs64, buffer)
            close(buffer, mine, torchs, dtype, peer=getattr(peer_m, buffer))
        _backward(y, y64, case["values_seed"], peer=peer)
        params = [ours_m.weight, ours_m.bias] if case["affine"] else [None, None]
        params64 = [theirs64.weight, theirs64.bias] if case["affine"] else [None, None]
        peers = [x_peer, *([peer_m.weight, peer_m.bias] if case["affine"] else [None] * 2)]
        names = ("x", "weight", "bias")
        _grads(case, [x_ours, *params], [x64, *params64], dtype, names, peers=peers)

    _outcome(
        case, lambda: ours_m(x_ours), lambda: theirs_m(x_theirs), lambda: theirs64(x64), compare,
        lambda: peer_m(x_peer),
    )  # fmt: skip
    if case["training"] and case["track"]:  # counted whether the step succeeded or not
        close(
            "num_batches_tracked", ours_m.num_batches_tracked, theirs_m.num_batches_tracked, "f64"
        )


def _renorm(case: dict) -> None:
    """``BatchRenorm2d``: plain BatchNorm during its warm-up (training), BatchNorm with its
    running mean and standard deviation in eval. torch has no counterpart for its errors:
    what torch's BatchNorm2d refuses must be refused cleanly (any type) or computed."""
    import torch.nn as nn

    from normbench.norms import BatchRenorm2d

    x, w, b, _, _, _ = _args(case)
    channels = _channels(x)
    eps = max(case["eps"], 1e-5)
    gen = torch.Generator().manual_seed(case["values_seed"])
    mean, std = torch.randn(channels, generator=gen), torch.rand(channels, generator=gen) + 0.5

    def make(renorm: bool):
        m = BatchRenorm2d(channels, eps=eps) if renorm else nn.BatchNorm2d(channels, eps=eps)
        m.train(case["training"])
        m.running_mean.copy_(mean)
        if renorm:
            m.running_std.copy_(std)
        else:
            m.running_var.copy_(std.square())
            m.eps = eps if case["training"] else 0.0  # renorm's eval: eps is inside its std
        if x.dtype == torch.float64:
            m.double()
        for kind, t in (("weight", w), ("bias", b)):
            if t is not None:
                grad = t.requires_grad and t.is_floating_point()
                setattr(m, kind, nn.Parameter(t.detach().clone(), requires_grad=grad))
        return m

    ours_m, torch_m = make(True), make(False)
    theirs_err, _ = error(lambda: torch_m(clone(x)))
    ours_err, y = error(lambda: ours_m(clone(x)))
    if theirs_err is not None and not _torch_bug(theirs_err):
        if ours_err is not None and not isinstance(
            ours_err, (RuntimeError, ValueError, NotImplementedError, IndexError)
        ):
            raise Mismatch(f"renorm: an unclean error {_exc(ours_err)}")
        return
    if ours_err is not None and not _known_difference(case, ours_err, theirs_err):
        raise Mismatch(f"renorm: torch's BatchNorm2d computed it, renorm raised {_exc(ours_err)}")
    if ours_err is not None:
        return
    for kind in ("weight", "bias"):  # (C,), as every torch takes them
        if getattr(torch_m, kind) is not None:
            flat = getattr(torch_m, kind).detach().reshape(-1).double()
            setattr(torch_m, kind, nn.Parameter(flat, requires_grad=False))
    close("y", y, torch_m.double()(float64(x, leaf=False)), _dtype(case))


# ------------------------------------------------------------------------------ the operators


def _nb():
    from normbench.kernels import ops

    return ops.library()


def _op_forward(case: dict) -> None:
    x, w, b, _, _, _ = _args(case)
    eps, relu, dtype = case["eps"], case["relu"], _dtype(case)

    def compare(ours, y64, peer):
        if eps <= 0:
            return  # F.batch_norm refuses it; 0 / 0 where a channel's values are all equal
        y, mean, invstd = ours
        peer = torch.relu(peer) if relu and peer is not None else peer
        close("y", y, torch.relu(y64) if relu else y64, dtype, peer=peer)
        x64 = float64(x, leaf=False)
        if x64.numel() > 0:
            dims = [0, *range(2, x64.dim())]
            close("mean", mean, x64.mean(dims), dtype)
            close("invstd", invstd, (x64.var(dims, unbiased=False) + eps).rsqrt(), dtype)

    _outcome(
        case,
        lambda: _nb().batch_norm_forward(clone(x), clone(w), clone(b), eps, relu),
        lambda: torch.batch_norm(x, w, b, None, None, True, 0.0, eps, False),
        lambda: torch.batch_norm(
            float64(x), param64(w), param64(b), None, None, True, 0.0, eps, False
        ),
        compare,
        lambda: torch.batch_norm(
            repaired(x), repaired(w, True), repaired(b, True), None, None, True, 0.0, eps, False
        ),
    )


def _op_eval(case: dict) -> None:
    x, w, b, rm, rv, _ = _args(case)
    if rm is None or rv is None:
        return  # the operator takes both: the functional's check (its own case) refuses
    eps, relu, dtype = case["eps"], case["relu"], _dtype(case)

    def compare(y, y64, peer):
        peer = torch.relu(peer) if relu and peer is not None else peer
        close("y", y, torch.relu(y64) if relu else y64, dtype, peer=peer)

    args = (x, w, b, rm, rv)
    _outcome(
        case,
        lambda: _nb().batch_norm_eval(*[clone(t) for t in (x, rm, rv, w, b)], eps, relu),
        lambda: torch.batch_norm(*args, False, 0.0, eps, False),
        lambda: torch.batch_norm(
            float64(x), param64(w), param64(b), float64(rm), float64(rv), False, 0.0, eps, False
        ),
        compare,
        lambda: torch.batch_norm(
            *(repaired(x), repaired(w, True), repaired(b, True), repaired(rm), repaired(rv)),
            False, 0.0, eps, False,
        ),
    )  # fmt: skip


def _op_stats(case: dict) -> None:
    x = Builder(case).x()
    eps, dtype = case["eps"], _dtype(case)

    def compare(ours, _, __):
        if eps <= 0:
            return  # as the forward's
        x64 = float64(x, leaf=False)
        if x64.numel() > 0:
            dims = [0, *range(2, x64.dim())]
            close("mean", ours[0], x64.mean(dims), dtype)
            close("invstd", ours[1], (x64.var(dims, unbiased=False) + eps).rsqrt(), dtype)

    _outcome(
        case,
        lambda: _nb().batch_norm_stats(clone(x), eps),
        lambda: torch.batch_norm(x, None, None, None, None, True, 0.0, eps, False),
        lambda: None,
        compare,
    )


def _statistics(case: dict, x: torch.Tensor, channels: int):
    """mean and invstd as the case asks: the batch's (the forward's), random, the wrong
    size, or an integer dtype."""
    kind = case["stats"]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(case["values_seed"] + 1)
    if kind == "batch" and x.is_floating_point() and x.device.type == "cpu" and x.numel() > 0:
        x64 = x.detach().double()
        dims = [0, *range(2, x.dim())]
        mean, var = x64.mean(dims), x64.var(dims, unbiased=False)
        return mean.to(acc), (var + 1e-5).rsqrt().to(acc)
    size = channels + 1 if kind == "wrong size" else channels
    mean = torch.randn(size, generator=gen, dtype=torch.float64)
    invstd = torch.rand(size, generator=gen, dtype=torch.float64) + 0.5
    if kind == "int":
        return mean.round().long(), invstd.round().long()
    return mean.to(acc), invstd.to(acc)


def _grad_out(case: dict, x: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(case["values_seed"] + 2)
    kind = case["grad_out"]
    shape = list(x.shape)
    if kind == "smaller" and shape and shape[0] > 0:
        shape[0] -= 1
    elif kind == "other shape" and len(shape) >= 2:
        shape = shape[::-1]
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    dtype = x.dtype if x.is_floating_point() else torch.float32
    if kind == "other dtype":
        dtype = torch.float64 if dtype != torch.float64 else torch.float32
    dy = dy.to(dtype)
    if kind == "channels_last" and dy.dim() == 4:
        dy = dy.contiguous(memory_format=torch.channels_last)
    if kind == "meta":
        dy = dy.to("meta")
    return dy


def _channels(x: torch.Tensor) -> int:
    return x.shape[1] if x.dim() > 1 else 1


def _op_backward(case: dict) -> None:
    """The backward operator against its contract: the forward's arguments as torch takes
    them, ``grad_out`` of x's shape, dtype and device, mean and invstd C floating values on
    x's device; the gradients of float64 math where valid, a clean error where not."""
    x, w, b, _, _, _ = _args(case)
    relu, dtype = case["relu"], _dtype(case)
    channels = _channels(x)
    mean, invstd = _statistics(case, x, channels)
    dy = _grad_out(case, x)
    forward_err, _ = error(lambda: torch.batch_norm(x, w, b, None, None, True, 0.0, 1e-5, False))
    valid = (
        (forward_err is None or _torch_bug(forward_err))
        and tuple(dy.shape) == tuple(x.shape)
        and dy.dtype == x.dtype
        and dy.device == x.device
        and mean.numel() == invstd.numel() == channels
        and mean.is_floating_point()
    )
    ours_err, ours = error(
        lambda: _nb().batch_norm_backward(
            clone(dy), clone(x), clone(w), clone(b), mean, invstd, relu
        )
    )
    if not valid or (_empty(case) and ours_err is not None):
        if ours_err is None and not _empty(case):
            raise Mismatch("op_backward: invalid arguments computed")
        if ours_err is not None and not isinstance(
            ours_err, (RuntimeError, NotImplementedError, IndexError)
        ):
            raise Mismatch(f"op_backward: an unclean error {_exc(ours_err)}")
        return
    if ours_err is not None and not _known_difference(case, ours_err, forward_err):
        raise Mismatch(f"op_backward: valid arguments refused: {_exc(ours_err)}")
    if ours_err is not None:
        return
    if x.device.type == "meta":
        return
    dx, dweight, dbias = ours
    x64, dy64 = float64(x, leaf=False), dy.double()
    dims = [0, *range(2, x64.dim())]
    shape = (1, channels, *[1] * (x64.dim() - 2))
    m, s = mean.double().reshape(shape), invstd.double().reshape(shape)
    w64 = float64(w, leaf=False).reshape(shape) if w is not None else torch.ones(shape)
    xhat = (x64 - m) * s
    if relu:
        b64 = float64(b, leaf=False).reshape(shape) if b is not None else torch.zeros(shape)
        dy64 = dy64.masked_fill(xhat * w64 + b64 <= 0, 0)  # as threshold_backward: NaN passes
    count = max(1, x64.numel() // channels)
    if x64.numel() == 0:
        close("dx", dx, x64, dtype, grad=True)
        return
    sum_dy = dy64.sum(dims, keepdim=True)
    sum_dy_xhat = (dy64 * xhat).sum(dims, keepdim=True)
    dx64 = w64 * s * (dy64 - sum_dy / count - xhat * sum_dy_xhat / count)
    close("dx", dx, dx64, dtype, grad=True)
    close("dweight", dweight, sum_dy_xhat.reshape(-1), dtype, grad=True)
    close("dbias", dbias, sum_dy.reshape(-1), dtype, grad=True)


def _op_update(case: dict) -> None:
    """The update operator against its contract (see batchnorm_cpu.cpp): running statistics
    1-d, C values, of one dtype (the statistics' or, with float32 statistics, float16 or
    bfloat16), not expanded, not requiring grad; the counter a one-element int64."""
    b = Builder(case)
    x = b.x()
    channels = _channels(x)
    rm, rv = b.per_channel("running_mean"), b.per_channel("running_var")
    if rm is None or rv is None:
        return  # the operator takes both
    counter = b.counter()
    mean, invstd = _statistics(case, x, channels)
    momentum = _momentum(case["momentum"])
    eps, count, cumulative = max(case["eps"], 0.0), case["count"], case["cumulative"]
    stat = mean.dtype
    reduced = (torch.float16, torch.bfloat16)
    valid = (
        mean.is_floating_point()
        and invstd.dtype == mean.dtype
        and invstd.numel() == mean.numel()
        and all(
            t.dim() == 1
            and t.numel() == mean.numel()
            and t.device.type == "cpu"
            and (t.dtype == stat or (stat == torch.float32 and t.dtype in reduced))
            and not (t.numel() > 1 and t.stride(0) == 0)
            and not t.requires_grad
            for t in (rm, rv)
        )
        and rv.dtype == rm.dtype
        and not (cumulative and (counter is None or counter.numel() != 1))
    )  # fmt: skip
    ours_rm, ours_rv, ours_counter = clone(rm), clone(rv), clone(counter)
    ours_err, _ = error(
        lambda: _nb().update_running_stats(
            ours_rm, ours_rv, mean, invstd, momentum, eps, count, ours_counter, cumulative
        )
    )
    if not valid:
        if ours_err is None:
            raise Mismatch("op_update: invalid arguments accepted")
        if not isinstance(ours_err, RuntimeError):
            raise Mismatch(f"op_update: an unclean error {_exc(ours_err)}")
        for name, ours, before in (("running_mean", ours_rm, rm), ("running_var", ours_rv, rv)):
            if ours.device.type == "cpu" and not torch.equal(ours.detach(), before.detach()):
                raise Mismatch(f"op_update: refused, yet {name} was written")
        if counter is not None and not torch.equal(ours_counter, counter):
            raise Mismatch("op_update: refused, yet the counter was incremented")
        return
    if ours_err is not None:
        raise Mismatch(f"op_update: valid arguments refused: {_exc(ours_err)}")
    factor = momentum
    if counter is not None:  # incremented as torch's module increments it: add_(1)
        if not torch.equal(ours_counter, counter + 1):
            raise Mismatch(f"op_update: counter {ours_counter}, expected {counter + 1}")
        if cumulative:
            factor = 1.0 / float(counter + 1)
    unbias = count / (count - 1) if count > 1 else 1.0
    m64, s64 = mean.double(), invstd.double()
    expected_m = (1 - factor) * rm.double() + factor * m64
    expected_v = (1 - factor) * rv.double() + factor * (1 / (s64 * s64) - eps) * unbias
    dtype = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}.get(
        rm.dtype, "f64"
    )
    close("running_mean", ours_rm, expected_m, dtype)
    close("running_var", ours_rv, expected_v, dtype)


# ------------------------------------------------------------------------------ the worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--last", type=int, required=True)
    parser.add_argument("--triton", action="store_true", help="the Triton kernels (interpreted)")
    parser.add_argument("--show", action="store_true", help="print each case's arguments")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("NORMBENCH_FUZZ_THREADS", "2")))
    from normbench.kernels import cpu, ops

    if ops.library() is None:
        print(json.dumps({"fatal": f"no kernel: {cpu.failure()}"}), flush=True)
        return 2
    backend = ops.triton_on_cpu() if args.triton else contextlib.nullcontext()
    if args.triton:
        LOOSE_INFINITY.update({"running_mean", "mean"})
    with backend:
        for index in range(args.first, args.last + 1):
            case = draw(args.seed, index)
            if args.triton and case["x"]["device"] == "meta":
                case["x"]["device"] = "cpu"
            print(json.dumps({"start": index}), flush=True)
            if os.environ.get("NORMBENCH_FUZZ_CRASH") == str(index):
                # test_kernel_fuzz.py's check that a crash is named: a real segfault
                import ctypes

                ctypes.string_at(0)
            try:
                run(case)
                result = {"index": index, "ok": True}
            except Exception as err:
                detail = "".join(traceback.format_exception_only(type(err), err)).strip()
                if not isinstance(err, Mismatch):
                    detail += "\n" + "".join(traceback.format_tb(err.__traceback__)[-3:])
                result = {"index": index, "ok": False, "detail": detail, "case": case}
            if args.show:
                result["case"] = case
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
