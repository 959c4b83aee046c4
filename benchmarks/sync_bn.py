"""sync_bn's forward+backward per layer on 2 gloo processes, against custom_bn's plus the
all_reduce time.

Each of the two processes (``torch.multiprocessing``, gloo over the loopback, one thread
each unless ``--threads``) times, interleaved in one loop (median of ``--repeats``
rounds, each the mean of ``--steps`` calls):

- custom_bn: normbench's BatchNorm2d on the process's own batch, forward + backward;
- sync_bn: normbench's SyncBatchNorm (every process one group), forward + backward;
- all_reduce: the two collectives sync_bn makes per step, alone: a float64 table of
  ``processes x (1 + 2C)`` (the forward's count, means and M2s) and ``2C`` float64 sums
  (the backward's), back to back, through :func:`normbench.distributed.reduce_sum` as
  sync_bn makes them (its wait spinning, not sleeping: ``distributed.finish``);
- in step: the same two collectives as they take place inside sync_bn's own steps, timed
  around each call (:func:`normbench.distributed.reduce_sum`), which includes waiting for
  the other process to reach it.

The ratios are sync_bn / (custom_bn + all_reduce), and sync_bn / (custom_bn + in step):
what synchronizing costs beyond the collectives themselves (the target: at most 1.3x),
against the collectives alone and against the collectives where they run. With gloo on
the loopback each small all_reduce costs hundreds of microseconds on a 2-core VM where
the waiting process sleeps, and more in a step (the processes reach it at different
times) than back to back. Shapes are
per process.

Usage: python benchmarks/sync_bn.py [--shapes 64x32x28x28 64x64x14x14 8x32x28x28]
       [--repeats 7] [--steps 20] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

from run_overhead import cpu_name

WORLD = 2


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.lower().split("x"))


def mean_seconds(fn, steps: int) -> float:
    """``fn()``'s mean time over ``steps`` calls in a row."""
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def join_gloo(rank: int, port: int, threads: int) -> None:
    """In a worker of :func:`run_ranks`: ``threads`` threads, freed memory kept as a run
    keeps it, and the gloo process group of the :data:`WORLD` workers joined."""
    import torch
    import torch.distributed as dist

    from normbench import allocator

    torch.set_num_threads(threads)
    allocator.keep_freed_memory()  # as a run does
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )


def run_ranks(worker: Callable, args: argparse.Namespace) -> dict[int, Any]:
    """``worker(rank, port, args, results)`` in :data:`WORLD` spawned processes, gloo on the
    loopback; what each put into ``results`` as ``(rank, value)``, by rank."""
    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    port = free_port()
    processes = [
        context.Process(target=worker, args=(rank, port, args, results)) for rank in range(WORLD)
    ]
    for p in processes:
        p.start()
    got: dict[int, Any] = {}
    while len(got) < WORLD:  # a worker that died puts nothing: stop, not wait forever
        if not results.empty():
            rank, value = results.get()
            got[rank] = value
            continue
        failed = [(rank, p.exitcode) for rank, p in enumerate(processes) if p.exitcode]
        if failed:
            for p in processes:
                p.kill()
            raise SystemExit(f"worker {failed[0][0]} failed (exit status {failed[0][1]})")
        time.sleep(0.05)
    for p in processes:
        p.join()
    return got


def worker(rank: int, port: int, args: argparse.Namespace, results) -> None:
    import torch
    import torch.distributed as dist

    from normbench import distributed
    from normbench.norms.batchnorm import BatchNorm
    from normbench.norms.syncbn import SyncBatchNorm

    join_gloo(rank, port, args.threads)
    # sync_bn's collectives timed where they run: its reduce_sum, wrapped
    spent: list[float] = []
    reduce_sum = distributed.reduce_sum

    def timed_reduce_sum(values, sync):
        start = time.perf_counter()
        reduce_sum(values, sync)
        spent.append(time.perf_counter() - start)

    distributed.reduce_sum = timed_reduce_sum
    everyone = distributed.SyncGroup(None, rank, WORLD)
    rows = []
    for text in args.shapes:
        shape = parse_shape(text)
        channels = shape[1]
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        dy = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
        local, synced = BatchNorm(channels), SyncBatchNorm(channels)
        table = torch.zeros(WORLD, 1 + 2 * channels, dtype=torch.float64)
        sums = torch.zeros(2 * channels, dtype=torch.float64)

        def step(layer, x=x, dy=dy):
            def run():
                layer(x).backward(dy)

            return run

        def collectives(table=table, sums=sums, everyone=everyone):  # as sync_bn makes them
            reduce_sum(table, everyone)
            reduce_sum(sums, everyone)

        cases = {"custom_bn": step(local), "sync_bn": step(synced), "all_reduce": collectives}
        times: dict[str, list[float]] = {name: [] for name in [*cases, "in_step"]}
        for fn in cases.values():  # warm-up
            mean_seconds(fn, 3)
        for _ in range(args.repeats):
            for name, fn in cases.items():  # the same order on both processes
                dist.barrier()
                spent.clear()
                times[name].append(mean_seconds(fn, args.steps))
                if name == "sync_bn":
                    times["in_step"].append(sum(spent) / args.steps)
        medians = {name: statistics.median(values) for name, values in times.items()}
        rows.append((text, medians))
    results.put((rank, rows))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["64x32x28x28", "64x64x14x14", "8x32x28x28"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="one small shape, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.repeats, args.steps = ["4x8x8x8"], 2, 2
    got = run_ranks(worker, args)
    print(
        f"{WORLD} gloo processes x {args.threads} thread(s), channels_last, median of "
        f"{args.repeats} x {args.steps} steps, torch {torch.__version__}, CPU: {cpu_name()}"
    )
    print(
        f"{'shape':<14}{'custom_bn':>12}{'sync_bn':>12}{'all_reduce':>12}{'in step':>12}"
        f"{'ratio':>9}{'in step':>9}"
    )
    for (shape, r0), (_, r1) in zip(got[0], got[1], strict=True):
        # the slower process's figure: the step waits on it
        t = {name: max(r0[name], r1[name]) for name in r0}
        alone = t["sync_bn"] / (t["custom_bn"] + t["all_reduce"])
        in_step = t["sync_bn"] / (t["custom_bn"] + t["in_step"])
        print(
            f"{shape:<14}{t['custom_bn'] * 1e6:>10.0f}us{t['sync_bn'] * 1e6:>10.0f}us"
            f"{t['all_reduce'] * 1e6:>10.0f}us{t['in_step'] * 1e6:>10.0f}us"
            f"{alone:>8.2f}x{in_step:>8.2f}x"
        )


if __name__ == "__main__":
    main()
