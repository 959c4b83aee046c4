"""What do the per-layer BatchNorm diagnostics (``eval.bn_stats``) cost a run?

Runs the quick preset's runs (``experiment=quick``: digits, 6 epochs, batch sizes 2, 8,
32), or the subset named, twice per repeat: with ``eval.bn_stats=true`` and with
``false``, one right after the other in a random order (the cells shuffled too), in one
process (the kernel compiled and the data loaded once), each into a fresh results
folder. A run's time is the wall-clock time of ``normbench.runner.run`` (building,
training, every epoch's evaluation and files, the end-of-run inference measurements).

Prints per (norm, batch size) the median over the repeats of each side's time and of the
paired overhead ``on / off - 1``, and the share of the ``on`` run's time its diagnostics
took (``bn_stats_time_s``, measuring and writing bn_stats.csv, over its time): on a shared
machine the paired wall times drift by more than the diagnostics cost, their own time
does not. Then the totals over every run of a repeat (the whole sweep's wall time, as a
user waits for it) and the diagnostics' share of the ``on`` total.

Usage: python benchmarks/bn_stats_cost.py [--norms custom_bn,batch_renorm]
       [--batch-sizes 2,32] [--repeats 3] [--threads 1] [--epochs 6]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

import torch

from normbench.config import compose
from normbench.runner import run

QUICK_NORMS = "custom_bn,torch_bn,layer,instance,group,batch_renorm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norms", default=QUICK_NORMS)
    parser.add_argument("--batch-sizes", default="2,8,32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    args = parser.parse_args()
    cells = [
        (norm, int(bs)) for norm in args.norms.split(",") for bs in args.batch_sizes.split(",")
    ]
    times: dict[tuple[str, int, bool], list[float]] = {}
    own: dict[tuple[str, int], list[float]] = {}
    totals: dict[bool, list[float]] = {True: [], False: []}
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        # untimed: the first run in a process pays for loading the kernel and the data
        run(compose(["experiment=quick", "epochs=1", f"out_dir={tmp}/warm-up", "threads=1"]))
        for repeat in range(args.repeats):
            total = {True: 0.0, False: 0.0}
            for norm, bs in rng.sample(cells, len(cells)):
                for on in rng.sample([True, False], 2):
                    overrides = [
                        "experiment=quick",
                        f"norm={norm}",
                        f"batch_size={bs}",
                        f"threads={args.threads}",
                        f"eval.bn_stats={str(on).lower()}",
                        f"out_dir={tmp}/r{repeat}-{on}",
                    ]
                    if args.epochs is not None:
                        overrides.append(f"epochs={args.epochs}")
                    clock = time.perf_counter()
                    outcome = run(compose(overrides))
                    seconds = time.perf_counter() - clock
                    total[on] += seconds
                    times.setdefault((norm, bs, on), []).append(seconds)
                    if on:
                        own.setdefault((norm, bs), []).append(
                            outcome.summary["bn_stats_time_s"] or 0.0
                        )
            for on in (True, False):
                totals[on].append(total[on])
            print(f"repeat {repeat + 1}: on {total[True]:.1f} s, off {total[False]:.1f} s")
    print(f"torch {torch.__version__}, threads {args.threads}, repeats {args.repeats}")
    print(f"{'norm':<14}{'batch':>6}{'on s':>9}{'off s':>9}{'overhead':>10}{'own share':>11}")
    for norm, bs in cells:
        on_times, off_times = times[norm, bs, True], times[norm, bs, False]
        paired = [a / b - 1 for a, b in zip(on_times, off_times, strict=True)]
        share = [s / t for s, t in zip(own[norm, bs], on_times, strict=True)]
        print(
            f"{norm:<14}{bs:>6}{statistics.median(on_times):>9.2f}"
            f"{statistics.median(off_times):>9.2f}{statistics.median(paired):>+10.1%}"
            f"{statistics.median(share):>11.1%}"
        )
    on, off = statistics.median(totals[True]), statistics.median(totals[False])
    ratios = [a / b - 1 for a, b in zip(totals[True], totals[False], strict=True)]
    shown = ", ".join(f"{r:+.1%}" for r in ratios)
    spent = [sum(own[cell][r] for cell in cells) for r in range(args.repeats)]
    shares = ", ".join(f"{s / t:.1%}" for s, t in zip(spent, totals[True], strict=True))
    print(f"all runs: on {on:.1f} s, off {off:.1f} s, {on / off - 1:+.1%} (per repeat: {shown})")
    print(f"the diagnostics' own share of the on runs' time, per repeat: {shares}")


if __name__ == "__main__":
    main()
