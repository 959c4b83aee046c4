"""Where a BatchNorm layer's training step goes: the kernels, and the layer around them.

``normbench bench`` times a whole layer step, ``layer(x).backward(dy)``, after
reading a 16 MB buffer (which evicts the core's caches, code included). This
script times, under the same conditions (same flush, units interleaved in a
shuffled order, medians), what such a step is made of:

- ``cpu layer``: normbench's ``BatchNorm2d`` on the C++ kernel, as ``normbench bench``;
- ``cpu kernels``: the same two operators called directly (``batch_norm_forward``, then
  ``batch_norm_backward``, through the dispatcher), no module, no autograd;
- ``empty layer``: a layer that does no work at all, an ``autograd.Function``
  returning ``torch.empty_like`` outputs in its forward and backward: the least any
  layer pays for Python, autograd and allocation when the caches are cold;
- ``torch layer``: ``torch.nn.BatchNorm2d``;
- ``copy``: ``dst.copy_(src)``, the bandwidth reference of ``normbench bench``.

The ``%`` columns are ``normbench bench``'s ``of copy`` figure (``5 x numel x 4``
bytes per step, against the copy's bandwidth) for the cpu layer, for the kernels
alone, and for a ``floor``: the empty layer's time plus the kernels' time, what a
layer around these kernels would reach if it cost no more than a layer that does
nothing.

Usage: python benchmarks/layer_overhead.py [--shape 128,64,8,8 ...] [--repeats 300]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from normbench import allocator
from normbench.kernels import cpu
from normbench.norms import BatchNorm2d


class EmptyLayer(torch.autograd.Function):
    """A layer with outputs and gradients, and no arithmetic."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        return torch.empty_like(dy), None, None


def units(shape: tuple[int, ...]) -> dict:
    ext = cpu.extension()
    if ext is None:
        raise SystemExit(f"the CPU kernel is not available: {cpu.failure()}")
    forward, backward = ext.batch_norm_forward.default, ext.batch_norm_backward.default
    channels = shape[1]
    x = torch.randn(shape).requires_grad_()
    dy = torch.randn(shape)
    ours, theirs = BatchNorm2d(channels), torch.nn.BatchNorm2d(channels)
    weight, bias = ours.weight.detach(), ours.bias.detach()
    src, dst = torch.randn(shape), torch.empty(shape)
    params = [ours.weight, ours.bias, theirs.weight, theirs.bias]

    def clear():
        x.grad = None
        for p in params:
            p.grad = None

    def kernels():
        xd = x.detach()
        with torch.no_grad():
            y, mean, invstd = forward(xd, weight, bias, 1e-5, False)
            backward(dy, xd, weight, bias, mean, invstd, False)

    return {
        "cpu layer": lambda: ours(x).backward(dy),
        "cpu kernels": kernels,
        "empty layer": lambda: EmptyLayer.apply(x, ours.weight, ours.bias).backward(dy),
        "torch layer": lambda: theirs(x).backward(dy),
        "copy": lambda: dst.copy_(src),
    }, clear


def measure(shape: tuple[int, ...], repeats: int, warmup: int = 10) -> dict[str, float]:
    return time_interleaved(*units(shape), repeats, warmup)


def time_interleaved(run: dict, clear, repeats: int, warmup: int = 10) -> dict[str, float]:
    """Median ms of each of ``run``'s units, after ``clear()`` and a 16 MB read each, in a
    shuffled order every repeat (benchmarks/plain_layer.py times its steps so too)."""
    flush = torch.ones(4 << 20)  # 16 MB, as normbench bench
    names = list(run)
    order = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(warmup + repeats):
        order.shuffle(names)
        for name in names:
            clear()
            flush.sum()
            start = time.perf_counter()
            run[name]()
            elapsed = time.perf_counter() - start
            if repeat >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", default=["128,64,8,8", "128,16,32,32"])
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    allocator.keep_freed_memory()  # as normbench bench and training runs

    table = Table(
        title="one training step after a 16 MB read: median ms; % of copy bandwidth",
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
    )
    names = ["cpu layer", "cpu kernels", "empty layer", "torch layer", "copy"]
    for column in ("shape", "cpu", "kernels", "empty", "torch", "copy"):
        table.add_column(column, justify="right", no_wrap=True)
    # normbench bench's "of copy" figure, for three steps
    for column in ("cpu %", "kernels %", "floor %"):
        table.add_column(column, justify="right", no_wrap=True)
    for text in args.shape:
        shape = tuple(int(s) for s in text.split(","))
        ms = measure(shape, args.repeats)
        numel = 1
        for extent in shape:
            numel *= extent

        def of_copy(step_ms: float, numel=numel, copy_ms=ms["copy"]) -> str:
            # (5 numel 4 bytes / step) / (2 numel 4 bytes / copy)
            return f"{100 * 2.5 * copy_ms / step_ms:.0f}%"

        table.add_row(
            "x".join(map(str, shape)),
            *(f"{ms[name]:.3f}" for name in names),
            of_copy(ms["cpu layer"]),
            of_copy(ms["cpu kernels"]),
            of_copy(ms["empty layer"] + ms["cpu kernels"]),
        )
    Console().print(table)


if __name__ == "__main__":
    main()
