"""normbench's BatchNorm2d as a user's own script runs it: no allocator tuning, no bench harness.

``normbench bench`` keeps freed memory in the process (``normbench.allocator``), as
training runs do. A user who imports :class:`normbench.norms.BatchNorm2d` into a script
of their own gets none of that: this script times exactly that case. For each shape,
a training step (``layer(x).backward(dy)``) of normbench's layer and of
``torch.nn.BatchNorm2d``, interleaved, each after reading a 16 MB buffer (as ``normbench
bench`` does, so that no step finds the last one's data in cache), with every thread
and with one; medians, their ratio, and normbench's GB/s (``normbench bench``'s least
traffic of a step, 5 x the input's bytes) as a fraction of the machine's copy bandwidth,
measured as ``normbench bench`` measures it, before the shapes and after each of them
(a shape's fraction is of the copies on either side of it).

normbench's own kernels reuse their freed outputs (the output pool of batchnorm_cpu.cpp,
``NORMBENCH_KERNEL_POOL_BYTES``; ``0`` switches it off, to time the layer without it); the
caption gives the pool's limit.

``--memory-format channels_last`` hands both layers NHWC input (and gradient), as a model
converted with ``model.to(memory_format=torch.channels_last)`` does.

Usage: python benchmarks/plain_layer.py [--shape 128,16,32,32 ...] [--repeats 60]
       [--memory-format contiguous|channels_last]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from layer_overhead import time_interleaved  # this folder's script, beside this one
from rich import box
from rich.console import Console
from rich.table import Table

from normbench.bench import copy_seconds, machine_copy_bytes
from normbench.config import LAYOUTS
from normbench.kernels import ops
from normbench.models import torch_memory_format
from normbench.norms import BatchNorm2d

SHAPES = ["128,16,32,32", "128,32,16,16", "128,64,8,8", "256,32,16,16", "2,16,32,32"]


def time_steps(
    shape: tuple[int, ...], repeats: int, warmup: int = 5, layout=torch.contiguous_format
) -> dict[str, float]:
    channels = shape[1]
    layers = {"normbench": BatchNorm2d(channels), "torch": torch.nn.BatchNorm2d(channels)}
    x = torch.randn(shape).contiguous(memory_format=layout).requires_grad_()
    dy = torch.randn(shape).contiguous(memory_format=layout)

    def clear() -> None:
        x.grad = None

    run = {name: (lambda layer=layer: layer(x).backward(dy)) for name, layer in layers.items()}
    return time_interleaved(run, clear, repeats, warmup)


def machine_copy_gbps(repeats: int = 5) -> float:
    """The machine's copy bandwidth, as ``normbench bench`` measures it: float32 arrays four
    times the largest cache, the median of ``repeats`` copies."""
    nbytes = machine_copy_bytes("cpu")
    return 2 * nbytes / statistics.median(copy_seconds(nbytes, repeats)) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", default=SHAPES)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--memory-format", choices=LAYOUTS, default="contiguous")
    args = parser.parse_args()
    layout = torch_memory_format(args.memory_format)
    table = Table(
        title=f"training step after a 16 MB read, no allocator tuning, {args.memory_format}: "
        "median ms",
        box=box.SIMPLE_HEAD,
    )
    for column in ("threads", "shape", "normbench", "torch", "speedup", "GB/s", "%mem"):
        table.add_column(column, justify="right")
    all_threads = torch.get_num_threads()
    # the machine copy before the shapes and after each one (always with every thread):
    # a shape's %mem is against the copies on either side of it, taken under its load
    machine = [machine_copy_gbps()]
    rows = []
    for threads in dict.fromkeys([all_threads, 1]):
        for text in args.shape:
            shape = tuple(int(s) for s in text.split(","))
            torch.set_num_threads(threads)
            rows.append((threads, shape, time_steps(shape, args.repeats, layout=layout)))
            torch.set_num_threads(all_threads)
            machine.append(machine_copy_gbps())
    for row, (threads, shape, ms) in enumerate(rows):
        bandwidth = statistics.mean(machine[row : row + 2])
        gbps = 5 * torch.Size(shape).numel() * 4 / (ms["normbench"] * 1e-3) / 1e9
        table.add_row(
            str(threads),
            "x".join(map(str, shape)),
            f"{ms['normbench']:.3f}",
            f"{ms['torch']:.3f}",
            f"{ms['torch'] / ms['normbench']:.2f}x",
            f"{gbps:.1f}",
            f"{100 * gbps / bandwidth:.0f}%",
        )
    library = ops.library()
    pool = "not built" if library is None else f"{library.pool_limit() / 2**20:.0f} MiB"
    table.caption = (
        f"%mem: of the machine's copy bandwidth, timed before and after each shape "
        f"({min(machine):.1f}-{max(machine):.1f} GB/s); normbench's output pool: {pool}"
    )
    Console().print(table)


if __name__ == "__main__":
    main()
