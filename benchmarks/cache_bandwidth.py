"""Read bandwidth of one core from its L2, its last-level cache and memory, timed interleaved.

The CPU kernel's two orders for channels-first tensors (see benchmarks/plane_order.py)
differ in where their second pass reads from: the channels order from the core's L2, the
samples order from the last-level cache (or memory). Which one is faster depends on how
much faster the L2 is than the L3, a property of the CPU's design rather than of its cache
sizes: so this script measures it. Each unit sums an array sized to sit in one level (half
the L2; eight times the L2 but at most a quarter of the L3; four times the L3) with
``torch.sum``, once untimed to bring it there and then, timed, as many times as read
``--mib`` MiB (at least once: a single sum of an L2-sized array would time torch's call
more than the read); the units
run in a shuffled order every repeat, so that each level's figure is taken under the same
load of a shared machine. Cache sizes as Linux lists them in sysfs (as the kernel reads
them).

Prints each level's median GB/s and quartiles, and the L3's and memory's bandwidth as a
fraction of the L2's.

Usage: python benchmarks/cache_bandwidth.py [--repeats 30] [--mib 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from normbench.bench import cpu_cache_bytes


def level_sizes() -> dict[str, int]:
    """Bytes of an array per level: one that stays in the L2, one in the last-level cache
    but not the L2, one in memory only."""
    l2, llc = cpu_cache_bytes(2), cpu_cache_bytes()
    if l2 is None or llc is None or llc <= l2:
        raise SystemExit("sysfs lists no L2 and larger last-level cache for cpu0")
    return {"L2": l2 // 2, "L3": min(8 * l2, llc // 4), "memory": 4 * llc}


def measure(
    sizes: dict[str, int], repeats: int, min_bytes: int, seed: int = 0
) -> dict[str, list[float]]:
    """GB/s of each ``sizes`` level per repeat: sums of its array, enough to read
    ``min_bytes`` (at least one), after one untimed sum; the levels in a shuffled order
    every repeat."""
    arrays = {name: torch.ones(size // 4) for name, size in sizes.items()}
    names = list(arrays)
    order = random.Random(seed)
    gbps: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        order.shuffle(names)
        for name in names:
            array = arrays[name]
            reads = max(1, -(-min_bytes // sizes[name]))
            array.sum()  # brings it into its level (the other levels' arrays evicted it)
            start = time.perf_counter()
            for _ in range(reads):
                array.sum()
            elapsed = time.perf_counter() - start
            gbps[name].append(reads * sizes[name] / elapsed / 1e9)
    return gbps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--mib", type=int, default=64, help="MiB read a timed unit")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = level_sizes()
    gbps = measure(sizes, args.repeats, args.mib << 20)
    l2 = statistics.median(gbps["L2"])
    table = Table(
        title=f"read bandwidth, {args.threads} thread(s): GB/s over {args.repeats} repeats"
    )
    for column in ("level", "array", "median GB/s", "quartiles", "of L2's"):
        table.add_column(column, justify="right")
    for name, values in gbps.items():
        q1, _, q3 = statistics.quantiles(values, n=4)
        median = statistics.median(values)
        table.add_row(
            name,
            f"{sizes[name] / 2**20:g} MiB",
            f"{median:.1f}",
            f"{q1:.1f}-{q3:.1f}",
            f"{median / l2:.0%}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
