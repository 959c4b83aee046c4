"""The CPU kernel's two orders for channels-first tensors, timed against each other in one process.

``NORMBENCH_KERNEL_PLANE_ORDER`` picks how the kernel reads an NCHW tensor: ``channels``
(tasks own blocks of channels, whose second pass reads them from the core's cache) or
``samples`` (tasks own runs of whole samples, each pass reading memory in order);
``auto``, the default, takes ``samples`` for inputs larger than the core's L2 that fit
half the last-level cache, or whose channel blocks would not fit the L2 (see "the
planes layout's order" in batchnorm_cpu.cpp).
The kernel reads the variable on every call, so this script times a training step
(``layer(x).backward(dy)``) of normbench's BatchNorm2d in each order and of
``torch.nn.BatchNorm2d``, interleaved in a shuffled order every repeat, each after a 16
MB read (as ``normbench bench`` does), with every thread and with one. Runs in separate
processes would compare two states of a shared machine instead of two orders.

Prints median ms, each order's speedup over torch, its GB/s (``normbench bench``'s least
traffic of a step, 5 x the input's bytes) as a fraction of the machine's copy bandwidth
(measured as ``normbench bench`` measures it, before the shapes and after each of them:
a shape's fraction is of the copies on either side of it), which
order ``auto`` took (forward/backward), and channels' time over auto's.

Usage: python benchmarks/plane_order.py [--shape 128,64,8,8 ...] [--repeats 80]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from layer_overhead import time_interleaved  # this folder's script, beside this one
from plain_layer import machine_copy_gbps
from rich import box
from rich.console import Console
from rich.table import Table

from normbench import allocator
from normbench.kernels import cpu, ops
from normbench.norms import BatchNorm2d

SHAPES = ["128,16,32,32", "128,32,16,16", "128,64,8,8", "256,32,16,16", "2,16,32,32"]
ORDERS = ("auto", "channels", "samples")


def time_steps(shape: tuple[int, ...], repeats: int) -> dict[str, float]:
    """Median ms of a training step: torch's layer, and normbench's in each order."""
    channels = shape[1]
    ours, theirs = BatchNorm2d(channels), torch.nn.BatchNorm2d(channels)
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)

    def clear() -> None:
        x.grad = None

    def step(order: str) -> None:
        os.environ[cpu.ORDER_ENV] = order  # microseconds, the same for every order
        ours(x).backward(dy)

    run = {order: (lambda order=order: step(order)) for order in ORDERS}
    run["torch"] = lambda: theirs(x).backward(dy)
    return time_interleaved(run, clear, repeats, warmup=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", default=SHAPES)
    parser.add_argument("--repeats", type=int, default=80)
    args = parser.parse_args()
    library = ops.library()
    if library is None:
        raise SystemExit(f"the CPU kernel is not built: {cpu.failure()}")
    allocator.keep_freed_memory()  # as normbench bench and training runs
    before = os.environ.get(cpu.ORDER_ENV)
    all_threads = torch.get_num_threads()
    # the machine copy before the shapes and after each one (always with every thread):
    # a shape's %mem is against the copies on either side of it, taken under its load
    machine = [machine_copy_gbps()]
    rows = []
    try:
        for threads in dict.fromkeys([all_threads, 1]):
            for text in args.shape:
                shape = tuple(int(s) for s in text.split(","))
                torch.set_num_threads(threads)
                os.environ.pop(cpu.ORDER_ENV, None)
                x = torch.empty(shape)
                took = f"{library.plane_order(x)}/{library.plane_order(x, True)}"
                rows.append((threads, shape, took, time_steps(shape, args.repeats)))
                torch.set_num_threads(all_threads)
                machine.append(machine_copy_gbps())
    finally:
        torch.set_num_threads(all_threads)
        os.environ.pop(cpu.ORDER_ENV, None)
        if before is not None:
            os.environ[cpu.ORDER_ENV] = before

    table = Table(
        title="training step after a 16 MB read, in each order: median ms",
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
    )
    columns = ["threads", "shape", "auto took", "torch", *ORDERS]
    columns += [f"{order} %mem" for order in ORDERS] + ["channels / auto"]
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    for row, (threads, shape, took, ms) in enumerate(rows):
        bandwidth = statistics.mean(machine[row : row + 2])
        nbytes = 5 * torch.Size(shape).numel() * 4
        table.add_row(
            str(threads),
            "x".join(map(str, shape)),
            took,
            f"{ms['torch']:.3f}",
            *(f"{ms[o]:.3f} ({ms['torch'] / ms[o]:.2f}x)" for o in ORDERS),
            *(f"{100 * nbytes / (ms[o] * 1e-3) / 1e9 / bandwidth:.0f}%" for o in ORDERS),
            f"{ms['channels'] / ms['auto']:.3f}",
        )
    table.caption = (
        f"(Nx): speedup over torch; %mem: of the machine's copy bandwidth, timed before and "
        f"after each shape ({min(machine):.1f}-{max(machine):.1f} GB/s)"
    )
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
