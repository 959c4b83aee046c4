"""normbench's BatchNorm kernel for CUDA, in Triton: the API of :mod:`reference`, and the
planning and launching of the kernels of :mod:`~normbench.kernels.triton_kernels`.

Four functions, with the signatures, layouts and dtypes of
:mod:`~normbench.kernels.reference` and the C++ CPU kernel, so the op layer can
call any of them: :func:`forward_train`, :func:`backward`, :func:`forward_eval`
and :func:`update_running_stats`. :func:`available` says whether triton could be
imported, :func:`interpreted` whether it runs as its interpreter; the kernels run CUDA
tensors, or CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, set before
triton is first imported), which the tests use.

Each call picks its layout from ``x``'s strides, planes or rows (see
:mod:`~normbench.kernels.triton_kernels`), and plans its tiles and grid once for all its
passes (:class:`_Plan`).

Each pass splits a channel's values across ``split`` programs: a grid of
``(C, split)`` programs for planes, ``(split, channel blocks)`` for rows, each
program taking a contiguous run of tiles. ``split`` grows until the grid holds
about ``PROGRAMS_PER_SM`` programs per SM, but a program never gets fewer than
``MIN_VALUES_PER_PROGRAM`` values of its channel: with 3 channels of 2^20 values
the GPU is still full, and with 512 channels each owns its whole channel.

Traffic: the forward reads ``x`` twice and writes ``y``; the backward reads ``(dy, x)``
twice and writes ``dx``: eight tensor passes a training step. ``normbench bench`` counts
five (each second read served by a cache, as the CPU kernel's are), so where the input
fits in the GPU's L2 (an H100's or H200's 50-60 MB: CIFAR-sized layers) the second reads
come from L2; where it does not (256x64x56x56 float32 is 205 MB), they come from memory
and the bench's fraction of the copy bandwidth is at most 5/8 (62.5%). Doing better on
such tensors means re-reading each channel while it is still in L2: a persistent kernel
that walks the channels in order, with a barrier among each channel's programs between
its two passes. Not built: it needs a GPU to develop and time.

Launch cost: shapes are runtime arguments; the constexprs are block sizes (powers
of two, from a few buckets), the accumulation dtype and the affine flags, so a
training run compiles each kernel a handful of times and never again.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch import Tensor

from normbench.kernels import checks
from normbench.kernels.triton_kernels import (
    available,
    interpreted,
    planes_grad_input,
    planes_grad_sums,
    planes_normalize,
    planes_stats,
    rows_grad_input,
    rows_grad_sums,
    rows_normalize,
    rows_stats,
    tl,  # triton.language, or None without triton
    update_running,
)

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
            rows_stats[p.grid](
                p.x, part, p.M, p.C, p.tiles, p.per, ACC=ACC, num_warps=NUM_WARPS, **blocks
            )
            rows_normalize[p.grid](
                p.x, y, part, mean, invstd, w, b, mean, invstd,
                p.M, p.C, p.tiles, p.per, p.split, float(eps), **flags, **blocks,
            )  # fmt: skip
        else:
            blocks = {"BLOCK_N": p.block_a, "BLOCK_L": p.block_b}
            planes_stats[p.grid](
                p.x, part, p.N, p.C, p.L, p.tiles_l, p.tiles, p.per,
                ACC=ACC, num_warps=NUM_WARPS, **blocks,
            )  # fmt: skip
            planes_normalize[p.grid](
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
            rows_grad_sums[p.grid](
                dy, p.x, mean, part, p.M, p.C, p.tiles, p.per, invstd, w, b,
                ACC=ACC, num_warps=NUM_WARPS, **relu_flags, **blocks,
            )  # fmt: skip
            rows_grad_input[p.grid](
                dy, p.x, dx, part, mean, invstd, w, dweight, dbias,
                p.M, p.C, p.tiles, p.per, p.split, count, b, **flags, **blocks,
            )  # fmt: skip
        else:
            blocks = {"BLOCK_N": p.block_a, "BLOCK_L": p.block_b}
            planes_grad_sums[p.grid](
                dy, p.x, mean, part, p.N, p.C, p.L, p.tiles_l, p.tiles, p.per, invstd, w, b,
                ACC=ACC, num_warps=NUM_WARPS, **relu_flags, **blocks,
            )  # fmt: skip
            planes_grad_input[p.grid](
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
            rows_normalize[p.grid](
                p.x, y, y, y, y, w, b, running_mean, running_var,
                p.M, p.C, p.tiles, p.per, p.split, float(eps),
                BLOCK_M=p.block_a, BLOCK_C=p.block_b, **flags,
            )  # fmt: skip
        else:
            planes_normalize[p.grid](
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
        update_running[(_cdiv(C, block),)](
            rm if rm is not None else mean,
            rv if rv is not None else invstd,
            mean, invstd, C, float(momentum), float(eps), float(unbias),
            HAS_MEAN=rm is not None, HAS_VAR=rv is not None, BLOCK=block,
            num_warps=4,
        )  # fmt: skip
    for given, written in ((running_mean, rm), (running_var, rv)):
        if given is not None and written is not given:
            given.copy_(written)
