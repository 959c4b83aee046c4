"""normbench's BatchNorm kernel for CUDA, in Triton: the API of :mod:`reference`.

Four functions, with the signatures, layouts and dtypes of
:mod:`~normbench.kernels.reference` and the C++ CPU kernel, so the op layer can
call any of them: :func:`forward_train`, :func:`backward`, :func:`forward_eval`
and :func:`update_running_stats`. :func:`available` says whether triton could be
imported; the kernels run CUDA tensors, or CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, set before triton is first imported), which the tests use.

Layouts (as in ``batchnorm_cpu.cpp``), chosen per call from ``x``'s strides:

- planes: channels-first contiguous ``(N, C, L)``, ``L = prod(spatial)``. A program
  owns one channel and walks 2-d tiles ``(BLOCK_N samples, BLOCK_L positions)``, so
  loads are contiguous along ``L`` and a small ``L`` (7x7) still fills a tile;
- rows: ``(M, C)`` row-major, ``M = N * L``: channels_last (4-d), channels_last_3d
  (5-d), 2-d ``(N, C)``, or ``L == 1``. A program owns ``BLOCK_C`` adjacent channels
  and walks tiles of ``BLOCK_M`` rows, so a tile is a contiguous stretch of memory.

Each pass splits a channel's values across ``split`` programs: a grid of
``(C, split)`` programs for planes, ``(split, channel blocks)`` for rows, each
program taking a contiguous run of tiles. ``split`` grows until the grid holds
about ``PROGRAMS_PER_SM`` programs per SM, but a program never gets fewer than
``MIN_VALUES_PER_PROGRAM`` values of its channel: with 3 channels of 2^20 values
the GPU is still full, and with 512 channels each owns its whole channel.

Passes (each a kernel launch over the same grid and tiles):

- training forward: (1) statistics, one read of ``x``: every program keeps a
  Welford ``(mean, M2, count)`` per tile lane, merges its lanes with Chan's
  formula and writes one partial per channel to a ``(3, split, C)`` workspace;
  (2) normalise, one read and one write: every program merges its channel's
  ``split`` partials (Chan again; a few dozen values from L2), the first program
  of a channel stores ``mean`` and ``invstd``, all apply ``(x - mean) * scale + b``.
- backward: (1) per-program partial sums of ``dy`` and ``dy * (x - mean)``, one read
  of ``(dy, x)``; (2) every program adds its channel's partials, the first stores
  ``dweight`` and ``dbias``, all write ``dx = dy * k1 + (x - mean) * k2 + k3``.
- eval forward: pass (2) alone, ``mean`` and ``invstd`` from the running statistics.
- running statistics: one tiny kernel over ``C``, in float64 like the C++ kernel.

Folding the merge into the second pass (rather than a third, per-channel kernel)
saves a launch, which matters more than the redundant merges on small inputs.

Traffic: the forward reads ``x`` twice and writes ``y``; the backward reads ``(dy, x)``
twice and writes ``dx``: eight tensor passes a training step. ``normbench bench`` counts
five (each second read served by a cache, as the CPU kernel's are), so where the input
fits in the GPU's L2 (an H100's or H200's 50-60 MB: CIFAR-sized layers) the second reads
come from L2; where it does not (256x64x56x56 float32 is 205 MB), they come from memory
and the bench's fraction of the copy bandwidth is at most 5/8 (62.5%). Doing better on
such tensors means re-reading each channel while it is still in L2: a persistent kernel
that walks the channels in order, with a barrier among each channel's programs between
its two passes. Not built: it needs a GPU to develop and time.

Numerics: the Welford updates see ``x - shift``, ``shift`` the channel's first value
(every program of a channel uses the same one, so the partials merge without a
change of origin). Subtracting a nearby value is exact in floating point, so data
with mean 1e4 and std 1 keeps its low digits, and the mean's rounding errors are
those of a number of size ~std, not ~1e4. The normalised value is
``((x - shift) - mean_shifted) * scale``, for the same reason. No one-pass
``E[x^2] - E[x]^2`` anywhere. Float16 and bfloat16 are computed in float32 and
rounded once; float64 throughout in float64. The per-channel finish (variance,
``invstd``, the backward coefficients) runs in float64: a handful of scalar
operations per program.

Launch cost: shapes are runtime arguments; the constexprs are block sizes (powers
of two, from a few buckets), the accumulation dtype and the affine flags, so a
training run compiles each kernel a handful of times and never again.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
from torch import Tensor

from normbench.kernels import checks

try:
    import triton
    import triton.language as tl
except Exception:  # not installed, or installed without a working backend: same answer
    triton = tl = None

__all__ = [
    "available",
    "interpreted",
    "backward",
    "forward_eval",
    "forward_train",
    "update_running_stats",
]

# Tunables, module-level so tests can shrink them to exercise the split path on tiny shapes.
TILE_VALUES = 2048  # values per tile (a power of two): 8 KiB of float32 per load, 8 per thread
MIN_VALUES_PER_PROGRAM = 16384  # fewer values than this and a program's fixed cost dominates
PROGRAMS_PER_SM = 4  # enough resident programs to hide memory latency
MAX_SPLIT = 64  # partials a program merges in pass (2): more would cost more than it spreads
INTERPRETER_PROGRAMS = 8  # the "GPU size" assumed for CPU tensors (the interpreter has no SMs)
NUM_WARPS = 8


def available() -> bool:
    """Whether triton could be imported (CUDA tensors, or CPU ones under the interpreter)."""
    return triton is not None


def interpreted() -> bool:
    """Whether triton runs as its interpreter (``TRITON_INTERPRET=1`` when it was imported)."""
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is None:  # an older triton (3.0) has no knobs: it reads the variable itself
        return os.environ.get("TRITON_INTERPRET") == "1"
    return bool(knobs.runtime.interpret)


def _jit(**options):
    """``triton.jit`` where triton imports; elsewhere the kernels stay plain, uncalled functions."""
    if triton is None:
        return lambda fn: fn
    return triton.jit(**options)


# ---------------------------------------------------------------------------- device helpers


@_jit()
def _welford_update(mean, m2, count, v, mask):
    # One value per lane; masked lanes keep their state (and never divide by zero).
    count = count + mask.to(count.dtype)
    delta = v - mean
    mean = mean + tl.where(mask, delta / tl.maximum(count, 1.0), 0.0)
    m2 = m2 + tl.where(mask, delta * (v - mean), 0.0)
    return mean, m2, count


@_jit()
def _welford_combine(mean_a, m2_a, count_a, mean_b, m2_b, count_b):
    # Chan et al.'s merge of two (mean, M2, count) summaries; an empty side is a no-op.
    count = count_a + count_b
    frac_b = count_b / tl.maximum(count, 1.0)
    delta = mean_b - mean_a
    return mean_a + delta * frac_b, m2_a + m2_b + delta * delta * count_a * frac_b, count


@_jit()
def _invstd(m2, count, eps):
    # Per channel, in float64: exact enough for float64 input, cheap at one value per program.
    # A NaN variance (from an infinite value) stays NaN, as torch's (tl.maximum would drop
    # it on a GPU).
    var = m2.to(tl.float64) / tl.maximum(count.to(tl.float64), 1.0)
    return 1.0 / tl.sqrt(tl.where(var < 0.0, 0.0, var) + eps)


@_jit()
def _finite_or_zero(v):
    # A channel's shift: its first value, or 0 where that is infinite or NaN (v - v is 0
    # exactly for finite v), so that the other values' statistics are not lost to it.
    return tl.where(v - v == 0.0, v, 0.0)


@_jit()
def _eval_constants(mean, scale, bias):
    # Eval with a scale that is not finite (a zero variance with eps = 0): torch's
    # x * scale + (bias - mean * scale), whose NaNs and infinities it gives.
    nonfinite = scale - scale != 0.0
    return tl.where(nonfinite, 0.0, mean), tl.where(nonfinite, bias - mean * scale, bias)


@_jit()
def _tile_range(split_id, tiles_total, tiles_per_program):
    # int64, so the loop index times a block size cannot overflow on the largest tensors
    start = split_id.to(tl.int64) * tiles_per_program
    return start, tl.minimum(start + tiles_per_program, tiles_total)


# ---------------------------------------------------------------------------- planes (N, C, L)


@_jit()
def _plane_tile(t, c, N, C, L, tiles_l, rn, rl, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    # Tile t of channel c: BLOCK_N samples by BLOCK_L positions; offsets into (N, C, L) and mask.
    tn = t // tiles_l
    n = tn * BLOCK_N + rn
    pos = (t - tn * tiles_l) * BLOCK_L + rl
    mask = (n < N) & (pos < L)
    return (n.to(tl.int64) * C + c) * L + pos, mask


@_jit(do_not_specialize=["tiles_total", "tiles_per_program"])
def _planes_stats(
    x_ptr, part_ptr, N, C, L, tiles_l, tiles_total, tiles_per_program,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    s = tl.program_id(1)
    split = tl.num_programs(1)
    shift = _finite_or_zero(tl.load(x_ptr + c.to(tl.int64) * L).to(ACC))
    rn = tl.arange(0, BLOCK_N)[:, None]
    rl = tl.arange(0, BLOCK_L)[None, :]
    mean = tl.zeros([BLOCK_N, BLOCK_L], ACC)
    m2 = tl.zeros([BLOCK_N, BLOCK_L], ACC)
    count = tl.zeros([BLOCK_N, BLOCK_L], ACC)
    start, stop = _tile_range(s, tiles_total, tiles_per_program)
    for t in range(start, stop):
        offs, mask = _plane_tile(t, c, N, C, L, tiles_l, rn, rl, BLOCK_N, BLOCK_L)
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - shift
        mean, m2, count = _welford_update(mean, m2, count, v, mask)
    mean, m2, count = tl.reduce((mean, m2, count), 1, _welford_combine)
    mean, m2, count = tl.reduce((mean, m2, count), 0, _welford_combine)
    base = part_ptr + s * C + c
    tl.store(base, mean)
    tl.store(base + split * C, m2)
    tl.store(base + 2 * split * C, count)


@_jit(do_not_specialize=["tiles_total", "tiles_per_program", "split"])
def _planes_normalize(
    x_ptr, y_ptr, part_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, rmean_ptr, rvar_ptr,
    N, C, L, tiles_l, tiles_total, tiles_per_program, split, eps: tl.float64,
    TRAIN: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr, RELU: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    s = tl.program_id(1)
    if TRAIN:
        shift = _finite_or_zero(tl.load(x_ptr + c.to(tl.int64) * L).to(ACC))
        k = tl.arange(0, BLOCK_S)
        kmask = k < split
        pm = tl.load(part_ptr + k * C + c, mask=kmask, other=0.0)
        pq = tl.load(part_ptr + (split + k) * C + c, mask=kmask, other=0.0)
        pn = tl.load(part_ptr + (2 * split + k) * C + c, mask=kmask, other=0.0)
        mean, m2, count = tl.reduce((pm, pq, pn), 0, _welford_combine)
        invstd = _invstd(m2, count, eps).to(ACC)
        first = s == 0  # one program per channel publishes the statistics
        tl.store(mean_ptr + c, shift + mean, mask=first)
        tl.store(invstd_ptr + c, invstd, mask=first)
    else:
        shift = 0.0
        mean = tl.load(rmean_ptr + c).to(ACC)
        invstd = (1.0 / tl.sqrt(tl.load(rvar_ptr + c).to(tl.float64) + eps)).to(ACC)
    scale = invstd
    if HAS_W:
        scale = invstd * tl.load(w_ptr + c).to(ACC)
    bias = 0.0
    if HAS_B:
        bias = tl.load(b_ptr + c).to(ACC)
    if not TRAIN:
        mean, bias = _eval_constants(mean, scale, bias)
    rn = tl.arange(0, BLOCK_N)[:, None]
    rl = tl.arange(0, BLOCK_L)[None, :]
    start, stop = _tile_range(s, tiles_total, tiles_per_program)
    for t in range(start, stop):
        offs, mask = _plane_tile(t, c, N, C, L, tiles_l, rn, rl, BLOCK_N, BLOCK_L)
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        y = ((v - shift) - mean) * scale + bias
        if RELU:  # max(y, 0), NaN kept as torch.relu keeps it
            y = tl.where(y < 0.0, 0.0, y)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@_jit()
def _relu_grad(g, v, mean, invstd, w, b, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """g, or 0 where the forward's pre-activation (x - mean) * invstd * w + b is <= 0."""
    scale = invstd
    if HAS_W:
        scale = invstd * w
    z = (v - mean) * scale
    if HAS_B:
        z = z + b
    return tl.where(z <= 0.0, 0.0, g)  # a NaN z passes g, as torch's threshold_backward


@_jit(do_not_specialize=["tiles_total", "tiles_per_program"])
def _planes_grad_sums(
    dy_ptr, x_ptr, mean_ptr, part_ptr, N, C, L, tiles_l, tiles_total, tiles_per_program,
    invstd_ptr, w_ptr, b_ptr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    RELU: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    s = tl.program_id(1)
    split = tl.num_programs(1)
    mean = tl.load(mean_ptr + c).to(ACC)
    if RELU:
        r_invstd = tl.load(invstd_ptr + c).to(ACC)
        r_w = tl.load(w_ptr + c).to(ACC)
        r_b = tl.load(b_ptr + c).to(ACC)
    rn = tl.arange(0, BLOCK_N)[:, None]
    rl = tl.arange(0, BLOCK_L)[None, :]
    sum_dy = tl.zeros([BLOCK_N, BLOCK_L], ACC)
    sum_dy_xmu = tl.zeros([BLOCK_N, BLOCK_L], ACC)
    start, stop = _tile_range(s, tiles_total, tiles_per_program)
    for t in range(start, stop):
        offs, mask = _plane_tile(t, c, N, C, L, tiles_l, rn, rl, BLOCK_N, BLOCK_L)
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)  # 0 outside: adds nothing
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        if RELU:
            g = _relu_grad(g, v, mean, r_invstd, r_w, r_b, HAS_W, HAS_B)
        sum_dy += g
        sum_dy_xmu += g * (v - mean)
    base = part_ptr + s * C + c
    tl.store(base, tl.sum(sum_dy))
    tl.store(base + split * C, tl.sum(sum_dy_xmu))


@_jit(do_not_specialize=["tiles_total", "tiles_per_program", "split"])
def _planes_grad_input(
    dy_ptr, x_ptr, dx_ptr, part_ptr, mean_ptr, invstd_ptr, w_ptr, dw_ptr, db_ptr,
    N, C, L, tiles_l, tiles_total, tiles_per_program, split, count: tl.float64, b_ptr,
    HAS_W: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr,
    RELU: tl.constexpr, HAS_B: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    s = tl.program_id(1)
    k = tl.arange(0, BLOCK_S)
    kmask = k < split
    sum_dy = tl.sum(tl.load(part_ptr + k * C + c, mask=kmask, other=0.0))
    sum_dy_xmu = tl.sum(tl.load(part_ptr + (split + k) * C + c, mask=kmask, other=0.0))
    mean = tl.load(mean_ptr + c).to(ACC)
    invstd = tl.load(invstd_ptr + c).to(tl.float64)
    first = s == 0
    tl.store(dw_ptr + c, (sum_dy_xmu.to(tl.float64) * invstd).to(ACC), mask=first)
    tl.store(db_ptr + c, sum_dy.to(ACC), mask=first)
    # dx = invstd * w * (dy - mean(dy) - xhat * mean(dy * xhat)) = dy * k1 + (x - mean) * k2 + k3
    k1 = invstd
    if HAS_W:
        k1 = invstd * tl.load(w_ptr + c).to(tl.float64)
    k2 = (-k1 * invstd * invstd * sum_dy_xmu.to(tl.float64) / count).to(ACC)
    k3 = (-k1 * sum_dy.to(tl.float64) / count).to(ACC)
    k1 = k1.to(ACC)
    if RELU:
        r_invstd = tl.load(invstd_ptr + c).to(ACC)
        r_w = tl.load(w_ptr + c).to(ACC)
        r_b = tl.load(b_ptr + c).to(ACC)
    rn = tl.arange(0, BLOCK_N)[:, None]
    rl = tl.arange(0, BLOCK_L)[None, :]
    start, stop = _tile_range(s, tiles_total, tiles_per_program)
    for t in range(start, stop):
        offs, mask = _plane_tile(t, c, N, C, L, tiles_l, rn, rl, BLOCK_N, BLOCK_L)
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        if RELU:
            g = _relu_grad(g, v, mean, r_invstd, r_w, r_b, HAS_W, HAS_B)
        dx = g * k1 + (v - mean) * k2 + k3
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------- rows (M, C)


@_jit()
def _row_tile(t, rows, cols, cmask, M, C, BLOCK_M: tl.constexpr):
    # Tile t of a column block: BLOCK_M rows of (M, C); offsets and mask.
    r = t * BLOCK_M + rows
    return r * C + cols[None, :], (r < M) & cmask[None, :]


@_jit(do_not_specialize=["tiles_total", "tiles_per_program"])
def _rows_stats(
    x_ptr, part_ptr, M, C, tiles_total, tiles_per_program,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    s = tl.program_id(0)
    split = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    shift = _finite_or_zero(tl.load(x_ptr + cols, mask=cmask, other=0.0).to(ACC))[None, :]
    rows = tl.arange(0, BLOCK_M)[:, None]
    mean = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    count = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    start, stop = _tile_range(s, tiles_total, tiles_per_program)
    for t in range(start, stop):
        offs, mask = _row_tile(t, rows, cols, cmask, M, C, BLOCK_M)
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - shift
        mean, m2, count = _welford_update(mean, m2, count, v, mask)
    mean, m2, count = tl.reduce((mean, m2, count), 0, _welford_combine)
    base = part_ptr + s * C + cols
    tl.store(base, mean, mask=cmask)
    tl.store(base + split * C, m2, mask=cmask)
    tl.store(base + 2 * split * C, count, mask=cmask)


@_jit(do_not_specialize=["tiles_total", "tiles_per_program", "split"])
def _rows_normalize(
    x_ptr, y_ptr, part_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, rmean_ptr, rvar_ptr,
    M, C, tiles_total, tiles_per_program, split, eps: tl.float64,
    TRAIN: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, RELU: tl.constexpr,
):  # fmt: skip
    s = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    if TRAIN:
        shift = _finite_or_zero(tl.load(x_ptr + cols, mask=cmask, other=0.0).to(ACC))
        k = tl.arange(0, BLOCK_S)[:, None]
        pmask = (k < split) & cmask[None, :]
        poffs = k * C + cols[None, :]
        pm = tl.load(part_ptr + poffs, mask=pmask, other=0.0)
        pq = tl.load(part_ptr + split * C + poffs, mask=pmask, other=0.0)
        pn = tl.load(part_ptr + 2 * split * C + poffs, mask=pmask, other=0.0)
        mean, m2, count = tl.reduce((pm, pq, pn), 0, _welford_combine)
        invstd = _invstd(m2, count, eps).to(ACC)
        first = cmask & (s == 0)  # one program per channel publishes the statistics
        tl.store(mean_ptr + cols, shift + mean, mask=first)
        tl.store(invstd_ptr + cols, invstd, mask=first)
    else:
        shift = tl.zeros([BLOCK_C], ACC)
        mean = tl.load(rmean_ptr + cols, mask=cmask, other=0.0).to(ACC)
        var = tl.load(rvar_ptr + cols, mask=cmask, other=1.0).to(tl.float64)
        invstd = (1.0 / tl.sqrt(var + eps)).to(ACC)
    scale = invstd
    if HAS_W:
        scale = invstd * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)
    bias = tl.zeros([BLOCK_C], ACC)
    if HAS_B:
        bias = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)
    if not TRAIN:
        mean, bias = _eval_constants(mean, scale, bias)
    shift = shift[None, :]
    mean = mean[None, :]
    scale = scale[None, :]
    bias = bias[None, :]
    rows = tl.arange(0, BLOCK_M)[:, None]
    start, stop = _tile_range(s, tiles_total, tiles_per_program)
    for t in range(start, stop):
        offs, mask = _row_tile(t, rows, cols, cmask, M, C, BLOCK_M)
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        y = ((v - shift) - mean) * scale + bias
        if RELU:
            y = tl.where(y < 0.0, 0.0, y)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@_jit(do_not_specialize=["tiles_total", "tiles_per_program"])
def _rows_grad_sums(
    dy_ptr, x_ptr, mean_ptr, part_ptr, M, C, tiles_total, tiles_per_program,
    invstd_ptr, w_ptr, b_ptr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    RELU: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
):  # fmt: skip
    s = tl.program_id(0)
    split = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    if RELU:
        r_invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        r_w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        r_b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    rows = tl.arange(0, BLOCK_M)[:, None]
    sum_dy = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    sum_dy_xmu = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    start, stop = _tile_range(s, tiles_total, tiles_per_program)
    for t in range(start, stop):
        offs, mask = _row_tile(t, rows, cols, cmask, M, C, BLOCK_M)
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)  # 0 outside: adds nothing
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        if RELU:
            g = _relu_grad(g, v, mean, r_invstd, r_w, r_b, HAS_W, HAS_B)
        sum_dy += g
        sum_dy_xmu += g * (v - mean)
    base = part_ptr + s * C + cols
    tl.store(base, tl.sum(sum_dy, 0), mask=cmask)
    tl.store(base + split * C, tl.sum(sum_dy_xmu, 0), mask=cmask)


@_jit(do_not_specialize=["tiles_total", "tiles_per_program", "split"])
def _rows_grad_input(
    dy_ptr, x_ptr, dx_ptr, part_ptr, mean_ptr, invstd_ptr, w_ptr, dw_ptr, db_ptr,
    M, C, tiles_total, tiles_per_program, split, count: tl.float64, b_ptr,
    HAS_W: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    RELU: tl.constexpr, HAS_B: tl.constexpr,
):  # fmt: skip
    s = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    k = tl.arange(0, BLOCK_S)[:, None]
    pmask = (k < split) & cmask[None, :]
    poffs = k * C + cols[None, :]
    sum_dy = tl.sum(tl.load(part_ptr + poffs, mask=pmask, other=0.0), 0)
    sum_dy_xmu = tl.sum(tl.load(part_ptr + split * C + poffs, mask=pmask, other=0.0), 0)
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(ACC)
    invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0).to(tl.float64)
    first = cmask & (s == 0)
    tl.store(dw_ptr + cols, (sum_dy_xmu.to(tl.float64) * invstd).to(ACC), mask=first)
    tl.store(db_ptr + cols, sum_dy.to(ACC), mask=first)
    k1 = invstd
    if HAS_W:
        k1 = invstd * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float64)
    k2 = (-k1 * invstd * invstd * sum_dy_xmu.to(tl.float64) / count).to(ACC)[None, :]
    k3 = (-k1 * sum_dy.to(tl.float64) / count).to(ACC)[None, :]
    k1 = k1.to(ACC)[None, :]
    mean = mean[None, :]
    if RELU:
        r_invstd = invstd.to(ACC)[None, :]
        r_w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        r_b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    rows = tl.arange(0, BLOCK_M)[:, None]
    start, stop = _tile_range(s, tiles_total, tiles_per_program)
    for t in range(start, stop):
        offs, mask = _row_tile(t, rows, cols, cmask, M, C, BLOCK_M)
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        if RELU:
            g = _relu_grad(g, v, mean, r_invstd, r_w, r_b, HAS_W, HAS_B)
        dx = g * k1 + (v - mean) * k2 + k3
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------- running statistics


@_jit()
def _store_from_float64(ptr, value, mask):
    # float64 values stored in the pointer's dtype, through float32 for the others: Triton's
    # interpreter turns float64 straight into bfloat16 garbage (NaN, denormals)
    if ptr.dtype.element_ty == tl.float64:
        tl.store(ptr, value, mask=mask)
    else:
        tl.store(ptr, value.to(tl.float32).to(ptr.dtype.element_ty), mask=mask)


@_jit()
def _update_running(
    rmean_ptr, rvar_ptr, mean_ptr, invstd_ptr, C,
    momentum: tl.float64, eps: tl.float64, unbias: tl.float64,
    HAS_MEAN: tl.constexpr, HAS_VAR: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # In float64, as the C++ kernel: running = (1 - momentum) * running + momentum * batch.
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < C
    if HAS_MEAN:
        old = tl.load(rmean_ptr + i, mask=mask, other=0.0).to(tl.float64)
        batch = tl.load(mean_ptr + i, mask=mask, other=0.0).to(tl.float64)
        _store_from_float64(rmean_ptr + i, (1.0 - momentum) * old + momentum * batch, mask)
    if HAS_VAR:
        old = tl.load(rvar_ptr + i, mask=mask, other=0.0).to(tl.float64)
        invstd = tl.load(invstd_ptr + i, mask=mask, other=1.0).to(tl.float64)
        batch = (1.0 / (invstd * invstd) - eps) * unbias
        _store_from_float64(rvar_ptr + i, (1.0 - momentum) * old + momentum * batch, mask)


# ---------------------------------------------------------------------------- launch planning


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _cuda_programs(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count * PROGRAMS_PER_SM


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_programs(device.index if device.index is not None else 0)
    return INTERPRETER_PROGRAMS


def _split(device: torch.device, groups: int, tiles: int, values: int) -> tuple[int, int]:
    """``(split, tiles_per_program)``: programs per channel group, and each one's run of tiles.

    Enough programs to fill the device, none with fewer than MIN_VALUES_PER_PROGRAM values,
    at most MAX_SPLIT (pass 2 merges them all), none left without a tile.
    """
    tiles = max(1, tiles)  # an empty batch: one idle program, never launched
    want = _cdiv(_target_programs(device), max(1, groups))
    split = max(1, min(want, values // max(1, MIN_VALUES_PER_PROGRAM), tiles, MAX_SPLIT))
    per = _cdiv(tiles, split)
    return _cdiv(tiles, per), per


class _Plan:
    """One call's layout, tiling and grid, shared by both passes so they walk the same tiles."""

    __slots__ = (
        "x", "rows", "N", "C", "L", "M", "grid", "split", "per", "tiles", "tiles_l",
        "block_a", "block_b", "block_s",
    )  # fmt: skip

    def __init__(self, x: Tensor):
        if x.dim() < 2:
            raise ValueError(f"batch norm expects (N, C, *) input, got {x.dim()} dims")
        N, C = x.shape[0], x.shape[1]
        L = math.prod(x.shape[2:])
        channels_last = (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) or (
            x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)
        )
        if x.is_contiguous():
            rows = L == 1
        elif channels_last:
            rows = True
        else:  # the op layer makes other strides contiguous first; stay correct regardless
            x = x.contiguous()
            rows = L == 1
        self.x, self.rows, self.N, self.C, self.L, self.M = x, rows, N, C, L, N * L
        tile = _pow2(TILE_VALUES)
        if rows:
            # A tile spans up to 256 channels (1 KiB of float32 per row): wide enough to coalesce,
            # narrow enough that a wide C still leaves BLOCK_M rows per tile.
            self.block_b = min(_pow2(C), 256, tile)
            self.block_a = min(tile // self.block_b, _pow2(self.M))
            self.tiles = self.tiles_l = _cdiv(self.M, self.block_a)
            groups = _cdiv(C, self.block_b)
        else:
            self.block_b = min(_pow2(L), tile)
            self.block_a = min(tile // self.block_b, _pow2(N))
            self.tiles_l = _cdiv(L, self.block_b)
            self.tiles = _cdiv(N, self.block_a) * self.tiles_l
            groups = C
        self.split, self.per = _split(x.device, groups, self.tiles, self.M)
        self.grid = (self.split, groups) if rows else (C, self.split)
        self.block_s = _pow2(self.split)

    def like(self, t: Tensor) -> Tensor:
        """``t`` (a gradient) in this plan's layout, so one offset addresses both."""
        if self.rows and self.x.dim() >= 4 and not self.x.is_contiguous():
            fmt = torch.channels_last if self.x.dim() == 4 else torch.channels_last_3d
            return t.contiguous(memory_format=fmt)
        return t.contiguous()


def _acc(dtype: torch.dtype) -> tuple[torch.dtype, object]:
    """The accumulation dtype, for torch and for triton (float32, or float64 for float64)."""
    acc = torch.promote_types(dtype, torch.float32)
    return acc, tl.float64 if acc == torch.float64 else tl.float32


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it ``device`` for the launches."""
    cuda = device.type == "cuda" and device.index is not None
    if cuda and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _per_channel(t: Tensor | None, C: int, name: str) -> Tensor | None:
    if t is not None and (t.numel() != C or not t.is_contiguous()):
        t = t.reshape(-1).contiguous()
        if t.numel() != C:
            raise ValueError(f"{name} has {t.numel()} values, expected {C}")
    return t


# ---------------------------------------------------------------------------- the API


def forward_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, relu: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalise with the batch's statistics: ``(y, mean, invstd)``, as :mod:`reference`
    (``y`` through a ReLU with ``relu``, in the same pass)."""
    checks.forward(x, weight, bias)  # before any pointer reaches a kernel
    p = _Plan(x)
    acc, ACC = _acc(x.dtype)
    y = torch.empty_like(p.x)
    mean = torch.empty(p.C, dtype=acc, device=x.device)
    invstd = torch.empty(p.C, dtype=acc, device=x.device)
    if p.M == 0:  # no values: undefined statistics, as torch and the C++ kernel
        return y, mean.fill_(math.nan), invstd.fill_(math.nan)
    if p.C == 0:
        return y, mean, invstd
    weight = _per_channel(weight, p.C, "weight")
    bias = _per_channel(bias, p.C, "bias")
    part = torch.empty(3, p.split, p.C, dtype=acc, device=x.device)
    # Absent weight/bias: any pointer stands in, the HAS_ flags compile its loads away.
    w = weight if weight is not None else mean
    b = bias if bias is not None else mean
    flags = {
        "TRAIN": True, "HAS_W": weight is not None, "HAS_B": bias is not None, "ACC": ACC,
        "BLOCK_S": p.block_s, "num_warps": NUM_WARPS, "RELU": bool(relu),
    }  # fmt: skip
    with _on(x.device):
        if p.rows:
            blocks = {"BLOCK_M": p.block_a, "BLOCK_C": p.block_b}
            _rows_stats[p.grid](
                p.x, part, p.M, p.C, p.tiles, p.per, ACC=ACC, num_warps=NUM_WARPS, **blocks
            )
            _rows_normalize[p.grid](
                p.x, y, part, mean, invstd, w, b, mean, invstd,
                p.M, p.C, p.tiles, p.per, p.split, float(eps), **flags, **blocks,
            )  # fmt: skip
        else:
            blocks = {"BLOCK_N": p.block_a, "BLOCK_L": p.block_b}
            _planes_stats[p.grid](
                p.x, part, p.N, p.C, p.L, p.tiles_l, p.tiles, p.per,
                ACC=ACC, num_warps=NUM_WARPS, **blocks,
            )  # fmt: skip
            _planes_normalize[p.grid](
                p.x, y, part, mean, invstd, w, b, mean, invstd,
                p.N, p.C, p.L, p.tiles_l, p.tiles, p.per, p.split, float(eps), **flags, **blocks,
            )  # fmt: skip
    return y, mean, invstd


def backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    bias: Tensor | None = None,
    relu: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`forward_train`: ``(dx, dweight, dbias)``, as :mod:`reference`.

    ``dweight`` (``sum(dy * xhat)``) is computed even when ``weight`` is None. With
    ``relu``, the gradient is first masked where the forward's ReLU was off (its
    pre-activation recomputed from ``x``, ``weight`` and ``bias``), inside both passes.
    """
    checks.backward(grad_out, x, weight, bias, mean, invstd)
    p = _Plan(x)
    acc, ACC = _acc(x.dtype)
    dy = p.like(grad_out)
    dx = torch.empty_like(p.x)
    dweight = torch.zeros(p.C, dtype=acc, device=x.device)
    dbias = torch.zeros(p.C, dtype=acc, device=x.device)
    if p.M == 0 or p.C == 0:
        return dx, dweight, dbias
    weight = _per_channel(weight, p.C, "weight")
    bias = _per_channel(bias, p.C, "bias")
    mean = _per_channel(mean, p.C, "mean")
    invstd = _per_channel(invstd, p.C, "invstd")
    part = torch.empty(2, p.split, p.C, dtype=acc, device=x.device)
    w = weight if weight is not None else mean
    b = bias if bias is not None else mean
    count = float(p.M)
    relu_flags = {"RELU": bool(relu), "HAS_W": weight is not None, "HAS_B": bias is not None}
    flags = {"ACC": ACC, "BLOCK_S": p.block_s, "num_warps": NUM_WARPS, **relu_flags}
    with _on(x.device):
        if p.rows:
            blocks = {"BLOCK_M": p.block_a, "BLOCK_C": p.block_b}
            _rows_grad_sums[p.grid](
                dy, p.x, mean, part, p.M, p.C, p.tiles, p.per, invstd, w, b,
                ACC=ACC, num_warps=NUM_WARPS, **relu_flags, **blocks,
            )  # fmt: skip
            _rows_grad_input[p.grid](
                dy, p.x, dx, part, mean, invstd, w, dweight, dbias,
                p.M, p.C, p.tiles, p.per, p.split, count, b, **flags, **blocks,
            )  # fmt: skip
        else:
            blocks = {"BLOCK_N": p.block_a, "BLOCK_L": p.block_b}
            _planes_grad_sums[p.grid](
                dy, p.x, mean, part, p.N, p.C, p.L, p.tiles_l, p.tiles, p.per, invstd, w, b,
                ACC=ACC, num_warps=NUM_WARPS, **relu_flags, **blocks,
            )  # fmt: skip
            _planes_grad_input[p.grid](
                dy, p.x, dx, part, mean, invstd, w, dweight, dbias,
                p.N, p.C, p.L, p.tiles_l, p.tiles, p.per, p.split, count, b, **flags, **blocks,
            )  # fmt: skip
    return dx, dweight, dbias


def forward_eval(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    relu: bool = False,
) -> Tensor:
    """Normalise with given statistics, one affine pass, as :mod:`reference` (through a
    ReLU with ``relu``, in the same pass)."""
    checks.eval_(x, running_mean, running_var, weight, bias)
    p = _Plan(x)
    _, ACC = _acc(x.dtype)
    y = torch.empty_like(p.x)
    if p.x.numel() == 0:
        return y
    running_mean = _per_channel(running_mean, p.C, "running_mean")
    running_var = _per_channel(running_var, p.C, "running_var")
    weight = _per_channel(weight, p.C, "weight")
    bias = _per_channel(bias, p.C, "bias")
    w = weight if weight is not None else running_mean
    b = bias if bias is not None else running_mean
    flags = {
        "TRAIN": False, "HAS_W": weight is not None, "HAS_B": bias is not None, "ACC": ACC,
        "BLOCK_S": 1, "num_warps": NUM_WARPS, "RELU": bool(relu),
    }  # fmt: skip
    # No partials, no statistics to publish: y stands in for those pointers, never touched.
    with _on(x.device):
        if p.rows:
            _rows_normalize[p.grid](
                p.x, y, y, y, y, w, b, running_mean, running_var,
                p.M, p.C, p.tiles, p.per, p.split, float(eps),
                BLOCK_M=p.block_a, BLOCK_C=p.block_b, **flags,
            )  # fmt: skip
        else:
            _planes_normalize[p.grid](
                p.x, y, y, y, y, w, b, running_mean, running_var,
                p.N, p.C, p.L, p.tiles_l, p.tiles, p.per, p.split, float(eps),
                BLOCK_N=p.block_a, BLOCK_L=p.block_b, **flags,
            )  # fmt: skip
    return y


def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    momentum: float,
    eps: float,
    count: int,
) -> None:
    """``running = (1 - momentum) * running + momentum * batch``, in place, in one launch.

    The batch variance is unbiased: ``(invstd**-2 - eps) * count / (count - 1)``, with
    ``count`` the values per channel. Either running tensor may be None (left alone).
    """
    checks.update(running_mean, running_var, mean, invstd)
    C = mean.numel()
    if C == 0 or (running_mean is None and running_var is None):
        return
    mean = _per_channel(mean, C, "mean")
    invstd = _per_channel(invstd, C, "invstd")
    unbias = count / (count - 1) if count > 1 else 1.0
    block = min(_pow2(C), 1024)
    # The kernel writes C values in a row: a strided statistic (a slice) is updated in a
    # contiguous copy, copied back.
    rm, rv = (t.contiguous() if t is not None else None for t in (running_mean, running_var))
    with _on(mean.device):
        _update_running[(_cdiv(C, block),)](
            rm if rm is not None else mean,
            rv if rv is not None else invstd,
            mean, invstd, C, float(momentum), float(eps), float(unbias),
            HAS_MEAN=rm is not None, HAS_VAR=rv is not None, BLOCK=block,
            num_warps=4,
        )  # fmt: skip
    for given, written in ((running_mean, rm), (running_var, rv)):
        if given is not None and written is not given:
            given.copy_(written)
