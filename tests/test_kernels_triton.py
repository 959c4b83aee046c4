"""The Triton BatchNorm kernels against the reference, on CUDA or under Triton's interpreter.

Without a GPU the kernels run on CPU tensors through ``TRITON_INTERPRET=1`` (set here too,
before triton is imported, for a lone run of this file), which executes every program in
numpy: shapes stay tiny. The split/merge path is forced on those tiny shapes by shrinking
the launch module's tile and per-program thresholds (``triton_launch``).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from normbench.kernels import reference, triton_kernels  # noqa: E402
from normbench.kernels import triton_launch as tk  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
EPS = 1e-5

TOL = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
}

CL = {4: torch.channels_last, 5: torch.channels_last_3d}

# (shape, memory format): planes (channels-first), rows (2-d, channels_last, L == 1)
LAYOUTS = [
    ((4, 3, 5, 5), None),
    ((8, 6, 3, 3), None),
    ((5, 7), None),
    ((4, 3, 5, 5), "cl"),
    ((3, 4, 6), None),
    ((2, 3, 4, 3, 2), "cl"),
    ((2, 3, 2, 3, 2), None),
    ((6, 5, 1, 1), None),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def split_everything(monkeypatch):
    """Tiles of 16 values and a program for every tile: tiny shapes take the split/merge path."""
    monkeypatch.setattr(tk, "TILE_VALUES", 16)
    monkeypatch.setattr(tk, "MIN_VALUES_PER_PROGRAM", 1)
    monkeypatch.setattr(tk, "INTERPRETER_PROGRAMS", 1024)


def make_x(shape, fmt=None, dtype=torch.float32, scale=2.0, offset=1.0):
    x = (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype).to(DEVICE)
    return x.contiguous(memory_format=CL[x.dim()]) if fmt == "cl" else x


def affine(c, dtype=torch.float32):
    w = torch.randn(c, dtype=dtype, device=DEVICE)
    b = torch.randn(c, dtype=dtype, device=DEVICE)
    return w, b


def dims_but_1(x):
    return [0, *range(2, x.dim())]


def channel(t, ndim):
    return t.reshape(1, -1, *([1] * (ndim - 2)))


def xhat64(x, mean, invstd):
    return (x.double() - channel(mean.double(), x.dim())) * channel(invstd.double(), x.dim())


def assert_layout(out, x):
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.stride() == x.stride(), "output must come back in x's layout"


# --- forward (training) ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("shape", "fmt"), LAYOUTS)
@pytest.mark.parametrize("with_affine", [True, False])
def test_forward_train_matches_reference(shape, fmt, dtype, with_affine):
    x = make_x(shape, fmt, dtype)
    w, b = affine(shape[1], dtype) if with_affine else (None, None)
    y, mean, invstd = tk.forward_train(x, w, b, EPS)
    y_ref, mean_ref, invstd_ref = reference.forward_train(x, w, b, EPS)
    assert_layout(y, x)
    assert mean.dtype == invstd.dtype == dtype and mean.shape == invstd.shape == (shape[1],)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(mean, mean_ref, **TOL[dtype])
    torch.testing.assert_close(invstd, invstd_ref, **TOL[dtype])


@pytest.mark.parametrize(
    ("shape", "fmt"), [((4, 3, 5, 5), None), ((4, 3, 5, 5), "cl"), ((9, 5), None)]
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(shape, fmt, dtype):
    x = make_x(shape, fmt, dtype)
    w, b = affine(shape[1], torch.float32)  # float32 parameters (torch's mixed precision)
    y, mean, invstd = tk.forward_train(x, w, b, EPS)
    y_ref, mean_ref, invstd_ref = reference.forward_train(x, w, b, EPS)
    assert_layout(y, x)
    assert mean.dtype == invstd.dtype == torch.float32
    torch.testing.assert_close(mean, mean_ref, **TOL[torch.float32])
    torch.testing.assert_close(invstd, invstd_ref, **TOL[torch.float32])
    # One rounding to the half type: at most one unit in the last place apart (the interpreter
    # truncates float32 -> bfloat16 where the GPU rounds to nearest).
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1.6e-2, atol=1e-2)

    dy = make_x(shape, fmt, dtype)
    dx, dweight, dbias = tk.backward(dy, x, w, mean, invstd)
    dx_ref, dweight_ref, dbias_ref = reference.backward(dy, x, w, mean, invstd)
    assert_layout(dx, x)
    assert dweight.dtype == dbias.dtype == torch.float32
    torch.testing.assert_close(dweight, dweight_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dbias, dbias_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx.float(), dx_ref.float(), rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("split", [False, True], ids=["one-program", "split"])
@pytest.mark.parametrize(
    ("shape", "fmt"), [((16, 2, 8, 8), None), ((16, 2, 8, 8), "cl"), ((512, 3), None)]
)
def test_large_mean_keeps_its_precision(shape, fmt, split, monkeypatch):
    # mean 1e4, std 1: the one-pass E[x^2] - E[x]^2 loses every digit of the variance in float32
    if split:
        monkeypatch.setattr(tk, "TILE_VALUES", 128)
        monkeypatch.setattr(tk, "MIN_VALUES_PER_PROGRAM", 1)
        monkeypatch.setattr(tk, "INTERPRETER_PROGRAMS", 1024)
    x = make_x(shape, fmt, torch.float32, scale=1.0, offset=1e4)
    y, mean, invstd = tk.forward_train(x, None, None, EPS)
    x64 = x.double()
    dims = dims_but_1(x64)
    mean64 = x64.mean(dims)
    var64 = x64.var(dims, unbiased=False)
    y64 = (x64 - channel(mean64, x.dim())) / channel(torch.sqrt(var64 + EPS), x.dim())
    assert (tk._Plan(x).split > 1) == split
    assert (y.double() - y64).abs().max().item() < 5e-3
    torch.testing.assert_close(invstd.double(), torch.rsqrt(var64 + EPS), rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("shape", "fmt"), [((6, 3, 2, 2), None), ((6, 3, 2, 2), "cl")])
def test_constant_channel_gives_finite_output(shape, fmt, dtype):
    x = make_x(shape, fmt, dtype)
    x[:, 1] = 7.25
    w, b = affine(shape[1], dtype)
    y, mean, invstd = tk.forward_train(x, w, b, EPS)
    assert torch.isfinite(y).all() and torch.isfinite(invstd).all()
    assert mean[1].item() == 7.25
    # eps reaches the kernel in float64: 1/sqrt(eps) to float64 precision
    rel = 1e-14 if dtype == torch.float64 else 1e-6
    assert invstd[1].item() == pytest.approx(1 / math.sqrt(EPS), rel=rel)
    torch.testing.assert_close(y[:, 1], torch.full_like(y[:, 1], b[1].item()))
    dx, dweight, dbias = tk.backward(torch.randn_like(x), x, w, mean, invstd)
    assert (
        torch.isfinite(dx).all() and torch.isfinite(dweight).all() and torch.isfinite(dbias).all()
    )


def test_empty_batch_gives_nan_statistics():
    x = torch.empty(0, 3, 4, 4, device=DEVICE)
    y, mean, invstd = tk.forward_train(x, None, None, EPS)
    assert y.shape == x.shape and mean.isnan().all() and invstd.isnan().all()
    dx, dweight, dbias = tk.backward(x, x, None, mean, invstd)
    assert dx.shape == x.shape and (dweight == 0).all() and (dbias == 0).all()


def test_other_strides_are_made_contiguous():
    x = make_x((5, 4, 3)).transpose(0, 2).contiguous().transpose(0, 2)  # neither layout
    assert not x.is_contiguous()
    y, mean, invstd = tk.forward_train(x, None, None, EPS)
    y_ref, _, _ = reference.forward_train(x, None, None, EPS)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])


# --- backward -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("shape", "fmt"), LAYOUTS)
@pytest.mark.parametrize("with_weight", [True, False])
def test_backward_matches_reference(shape, fmt, dtype, with_weight):
    x = make_x(shape, fmt, dtype)
    w = affine(shape[1], dtype)[0] if with_weight else None
    _, mean, invstd = reference.forward_train(x, w, None, EPS)
    dy = make_x(shape, fmt, dtype)
    dx, dweight, dbias = tk.backward(dy, x, w, mean, invstd)
    dx_ref, _, dbias_ref = reference.backward(dy, x, w, mean, invstd)
    assert_layout(dx, x)
    assert dweight.dtype == dbias.dtype == dtype
    torch.testing.assert_close(dx, dx_ref, **TOL[dtype])
    torch.testing.assert_close(dbias, dbias_ref, **TOL[dtype])
    # dweight = sum(dy * xhat) is returned even without a weight
    dweight64 = (dy.double() * xhat64(x, mean, invstd)).sum(dims_but_1(x))
    torch.testing.assert_close(dweight.double(), dweight64, **TOL[dtype])


@pytest.mark.parametrize(("shape", "x_fmt", "dy_fmt"), [
    ((4, 3, 5, 5), "cl", None), ((4, 3, 5, 5), None, "cl"), ((2, 3, 4, 3, 2), None, "cl"),
])  # fmt: skip
def test_grad_out_in_the_other_layout(shape, x_fmt, dy_fmt):
    x = make_x(shape, x_fmt, torch.float64)
    w = affine(shape[1], torch.float64)[0]
    _, mean, invstd = tk.forward_train(x, w, None, EPS)
    dy = make_x(shape, dy_fmt, torch.float64)
    dx, dweight, dbias = tk.backward(dy, x, w, mean, invstd)
    dx_ref, dweight_ref, dbias_ref = reference.backward(dy, x, w, mean, invstd)
    assert_layout(dx, x)
    torch.testing.assert_close(dx, dx_ref, **TOL[torch.float64])
    torch.testing.assert_close(dweight, dweight_ref, **TOL[torch.float64])
    torch.testing.assert_close(dbias, dbias_ref, **TOL[torch.float64])


# --- the split/merge path -------------------------------------------------------------------


@pytest.mark.usefixtures("split_everything")
@pytest.mark.parametrize(
    ("shape", "fmt"), [((4, 3, 5, 5), None), ((4, 3, 5, 5), "cl"), ((37, 5), None)]
)
def test_split_programs_merge_exactly(shape, fmt):
    x = make_x(shape, fmt, torch.float64)
    w, b = affine(shape[1], torch.float64)
    plan = tk._Plan(x)
    assert plan.split > 1 and plan.split * plan.per >= plan.tiles
    y, mean, invstd = tk.forward_train(x, w, b, EPS)
    y_ref, mean_ref, invstd_ref = reference.forward_train(x, w, b, EPS)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    torch.testing.assert_close(mean, mean_ref, **TOL[torch.float64])
    torch.testing.assert_close(invstd, invstd_ref, **TOL[torch.float64])

    dy = make_x(shape, fmt, torch.float64)
    dx, dweight, dbias = tk.backward(dy, x, w, mean, invstd)
    dx_ref, dweight_ref, dbias_ref = reference.backward(dy, x, w, mean, invstd)
    torch.testing.assert_close(dx, dx_ref, **TOL[torch.float64])
    torch.testing.assert_close(dweight, dweight_ref, **TOL[torch.float64])
    torch.testing.assert_close(dbias, dbias_ref, **TOL[torch.float64])

    rm, rv = mean_ref * 0.5, invstd_ref.pow(-2) + 0.25
    y_eval = tk.forward_eval(x, rm, rv, w, b, EPS)
    torch.testing.assert_close(
        y_eval, reference.forward_eval(x, rm, rv, w, b, EPS), **TOL[torch.float64]
    )


def test_split_choice(monkeypatch):
    monkeypatch.setattr(tk, "MIN_VALUES_PER_PROGRAM", 1000)
    monkeypatch.setattr(tk, "MAX_SPLIT", 64)
    device = torch.device("cpu")
    monkeypatch.setattr(tk, "INTERPRETER_PROGRAMS", 512)
    # few channels, many values: split up to fill the device
    assert tk._split(device, groups=4, tiles=1000, values=10**6) == (63, 16)
    # values per program bounded below
    assert tk._split(device, groups=4, tiles=1000, values=5000)[0] == 5
    # many channels: one program each
    assert tk._split(device, groups=1024, tiles=1000, values=10**6) == (1, 1000)
    # never more programs than tiles
    assert tk._split(device, groups=1, tiles=3, values=10**6) == (3, 1)


# --- eval and running statistics ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shape", "fmt"), LAYOUTS)
def test_forward_eval_matches_reference(shape, fmt, dtype):
    x = make_x(shape, fmt, dtype)
    c = shape[1]
    # the parameters in x's dtype, or float32 for bfloat16 x (torch's mixed precision)
    params = torch.float32 if dtype == torch.bfloat16 else dtype
    rm = torch.randn(c, device=DEVICE, dtype=params)
    rv = torch.rand(c, device=DEVICE, dtype=params) + 0.5
    w, b = affine(c, params)
    for weight, bias in [(w, b), (None, None)]:
        y = tk.forward_eval(x, rm, rv, weight, bias, EPS)
        y_ref = reference.forward_eval(x, rm, rv, weight, bias, EPS)
        assert_layout(y, x)
        tol = TOL.get(dtype, {"rtol": 1.6e-2, "atol": 1e-2})
        torch.testing.assert_close(y.double(), y_ref.double(), **tol)


@pytest.mark.parametrize("stat_dtype", [torch.float32, torch.float64, torch.float16])
def test_update_running_stats(stat_dtype):
    c, count, momentum = 5, 48, 0.1
    x = make_x((12, c, 2, 2), dtype=stat_dtype)  # running statistics of x's dtype, as torch's
    _, mean, invstd = tk.forward_train(x, None, None, EPS)
    rm = torch.randn(c, device=DEVICE).to(stat_dtype)
    rv = (torch.rand(c, device=DEVICE) + 0.5).to(stat_dtype)
    expected_m = (1 - momentum) * rm.double() + momentum * mean
    batch_var = x.var(dims_but_1(x), unbiased=True)
    expected_v = (1 - momentum) * rv.double() + momentum * batch_var
    tk.update_running_stats(rm, rv, mean, invstd, momentum, EPS, count)
    tol = TOL.get(stat_dtype, {"rtol": 1e-3, "atol": 1e-3})
    torch.testing.assert_close(rm, expected_m.to(stat_dtype), **tol)
    torch.testing.assert_close(rv, expected_v.to(stat_dtype), **tol)


@pytest.mark.parametrize("stat_dtype", [torch.float32, torch.float64])
def test_update_running_stats_matches_reference(stat_dtype):
    c, count = 6, 40
    x = make_x((10, c, 4), dtype=stat_dtype)
    _, mean, invstd = tk.forward_train(x, None, None, EPS)
    rm = torch.randn(c, device=DEVICE, dtype=stat_dtype)
    rv = torch.rand(c, device=DEVICE, dtype=stat_dtype) + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    tk.update_running_stats(rm, rv, mean, invstd, 0.1, EPS, count)
    reference.update_running_stats(rm_ref, rv_ref, mean, invstd, 0.1, EPS, count)
    torch.testing.assert_close(rm, rm_ref, **TOL[torch.float32])
    torch.testing.assert_close(rv, rv_ref, **TOL[torch.float32])


def test_update_running_stats_matches_torch_and_skips_none():
    c = 4
    x = make_x((10, c, 3))
    rm, rv = torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE)
    rm_t, rv_t = rm.clone(), rv.clone()
    torch.nn.functional.batch_norm(x, rm_t, rv_t, training=True, momentum=0.3, eps=EPS)
    _, mean, invstd = tk.forward_train(x, None, None, EPS)
    tk.update_running_stats(rm, rv, mean, invstd, 0.3, EPS, 30)
    torch.testing.assert_close(rm, rm_t)
    torch.testing.assert_close(rv, rv_t)
    before = rv.clone()
    tk.update_running_stats(rm, None, mean, invstd, 0.3, EPS, 30)
    assert torch.equal(rv, before)


# --- packaging ------------------------------------------------------------------------------


def test_available_here():
    assert tk.available()


def test_import_without_triton_reports_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("_triton_kernels_probe", triton_kernels.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.available() is False


# --- the compiler ---------------------------------------------------------------------------


def test_every_launch_compiles_for_a_cuda_gpu(tmp_path):
    """The interpreter runs what the compiler would reject (a loop-carried value that changes
    type, say), so every distinct launch of the quick cases is compiled for sm_90 too, by
    triton's own compiler, in a process without TRITON_INTERPRET (tests/triton_compile.py)."""
    import re
    import subprocess
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile here, not from an earlier run's cache
    script = Path(__file__).with_name("triton_compile.py")
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"compiled (\d+) of (\d+) kernels for sm_90 \((\d+) functions", done.stdout)
    assert found, done.stdout
    compiled, total, functions = map(int, found.groups())
    assert compiled == total > 0
    # every kernel the module launches (`name[grid](...)`) was launched and compiled
    launched = set(re.findall(r"(\w+)\[[^\]\n]*\]\(", Path(tk.__file__).read_text()))
    names = re.search(r"^functions: (.*)$", done.stdout, re.M).group(1).split()
    assert len(names) == functions
    assert set(names) == launched, launched


def test_interpreted_follows_the_variable_where_triton_has_no_knobs(monkeypatch):
    # triton 3.0 (torch 2.4's) has no triton.knobs: its interpreter is on when the
    # variable is "1" as triton is imported, which interpreted() then reads itself.
    monkeypatch.setattr(triton_kernels, "triton", object())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_kernels.interpreted()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_kernels.interpreted()
    monkeypatch.setattr(triton_kernels, "triton", None)
    assert not triton_kernels.interpreted()
