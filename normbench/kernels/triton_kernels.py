"""The Triton kernels of normbench's BatchNorm: the device code, a ``@triton.jit`` function
per pass and layout, which :mod:`~normbench.kernels.triton_launch` plans and launches.

:func:`available` says whether triton could be imported; the kernels run CUDA tensors, or
CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is first
imported), which the tests use. Without triton the module still imports: the kernels stay
plain, uncalled functions.

Layouts (as in ``batchnorm_cpu.cpp``), chosen per call from ``x``'s strides
(:mod:`~normbench.kernels.triton_launch`):

- planes: channels-first contiguous ``(N, C, L)``, ``L = prod(spatial)``. A program
  owns one channel and walks 2-d tiles ``(BLOCK_N samples, BLOCK_L positions)``, so
  loads are contiguous along ``L`` and a small ``L`` (7x7) still fills a tile;
- rows: ``(M, C)`` row-major, ``M = N * L``: channels_last (4-d), channels_last_3d
  (5-d), 2-d ``(N, C)``, or ``L == 1``. A program owns ``BLOCK_C`` adjacent channels
  and walks tiles of ``BLOCK_M`` rows, so a tile is a contiguous stretch of memory.

Passes (each a kernel launch over the same grid and tiles; each channel's values split
across ``split`` programs, as :mod:`~normbench.kernels.triton_launch` plans them):

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
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
except Exception:  # not installed, or installed without a working backend: same answer
    triton = tl = None

__all__ = [
    "available",
    "interpreted",
    "planes_stats",
    "planes_normalize",
    "planes_grad_sums",
    "planes_grad_input",
    "rows_stats",
    "rows_normalize",
    "rows_grad_sums",
    "rows_grad_input",
    "update_running",
]


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
def planes_stats(
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
def planes_normalize(
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
def planes_grad_sums(
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
def planes_grad_input(
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
def rows_stats(
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
def rows_normalize(
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
def rows_grad_sums(
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
def rows_grad_input(
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
def update_running(
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
