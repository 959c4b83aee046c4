"""Where a whole ``normbench run`` spends its wall time, custom_bn against torch_bn.

Each run is ``normbench run`` in a fresh Python process (so start-up, imports included,
is counted as a user pays it): ``small_cnn`` on MNIST-sized data, 28x28 images written
as MNIST's IDX files into a temporary folder (random pixels: the speed of a step does
not depend on what they show; no download). The child process wraps normbench's own
functions to time each phase of the run:

- start-up: from the process's spawn to the training loop's start (imports, the config,
  loading the data, building the model, the first-step check);
- training: the loop's own epoch times (the steps, ``epoch_time_s``);
- evaluation: the per-epoch test (and validation) evaluation;
- precise_bn: PreciseBN's re-estimation and its test accuracy (the last epoch);
- batch_stats: the batch-statistics test accuracy (the last epoch);
- bn_stats: the per-layer BatchNorm diagnostics (``eval.bn_stats``) each epoch;
- writing: metrics.csv, summary.json, the checkpoint and bn_stats.csv;
- exit: from the run's end (its summary written, the CLI's last line printed) to the
  process's exit;
- other: the rest of the wall time (the loop's bookkeeping, the summary, the lock).

A variant may carry overrides of its runs only, ``NORM:KEY=VALUE`` (more with more
colons): ``custom_bn:processes=2:threads=2`` against ``custom_bn:threads=2`` times 2
processes x 1 thread against 1 process x 2 threads on the same global batch (a
data-parallel run's phases other than training are not seen: its processes are its own).

The variants alternate run by run (a shuffled order each repeat), and each ratio pairs
runs of the same repeat: the machine's speed drifts between runs. ``--before DIR`` runs
every variant a second time on another checkout of normbench (its folder holding the
``normbench`` package, e.g. from ``git archive``), interleaved with this one's: before
and after a change in one invocation.

Usage: python benchmarks/run_overhead.py [--norms custom_bn torch_bn] [--epochs 4]
       [--train-images 60000] [--test-images 10000] [--batch-size 128] [--repeats 3]
       [--threads N] [--override KEY=VALUE ...] [--before DIR] [--digits COPIES]
       [--quick] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = (
    "startup",
    "training",
    "evaluation",
    "precise_bn",
    "batch_stats",
    "bn_stats",
    "writing",
    "exit",
    "other",
)


def write_mnist(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """Random 28x28 images and labels in MNIST's IDX format, where torchvision looks."""
    import numpy as np

    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        for name, magic, array in (("images-idx3", 0x803, images), ("labels-idx1", 0x801, labels)):
            header = struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in array.shape)
            (raw / f"{prefix}-{name}-ubyte").write_bytes(header + array.tobytes())


def write_digits(root: Path, copies: int, seed: int = 0) -> tuple[int, int]:
    """scikit-learn's 8x8 digits, scaled 3x and padded to 28x28, in MNIST's IDX format: a
    data set that can be learned (accuracy means something), MNIST-sized. The training
    images ``copies`` times, each copy shifted by up to 2 pixels; (train, test) counts."""
    import numpy as np
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.kron(bunch.images, np.ones((3, 3))) * (255 / 16)  # (n, 24, 24)
    images = np.pad(images, ((0, 0), (2, 2), (2, 2))).astype(np.uint8)
    labels = bunch.target.astype(np.uint8)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    test, train = order[:360], order[360:]
    shifted = [
        np.roll(images[train], tuple(rng.integers(-2, 3, size=2)), axis=(1, 2))
        for _ in range(copies)
    ]
    splits = {
        "train": (np.concatenate(shifted), np.tile(labels[train], copies)),
        "t10k": (images[test], labels[test]),
    }
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, (x, y) in splits.items():
        for name, magic, array in (("images-idx3", 0x803, x), ("labels-idx1", 0x801, y)):
            header = struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in array.shape)
            (raw / f"{prefix}-{name}-ubyte").write_bytes(header + array.tobytes())
    return len(splits["train"][1]), len(test)


# --------------------------------------------------------------------------- the child


class _Clock:
    """Seconds spent per phase, and the moment the training loop started."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.loop_start: float | None = None
        self.depth = 0  # a phase inside another (a write inside bn_stats) counts once

    def wrap(self, owner, name: str, phase: str | None, pick=None) -> None:
        original = getattr(owner, name)
        clock = self

        def timed(*args, **kwargs):
            which = pick(args) if pick else phase
            clock.depth += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                clock.depth -= 1
                if clock.depth == 0:
                    clock.seconds[which] += time.perf_counter() - start

        setattr(owner, name, timed)


def child(args: argparse.Namespace) -> None:
    """One run in this process, timed by phase; prints one JSON line."""
    spawned = float(os.environ["RUN_OVERHEAD_SPAWNED"])
    import normbench.diagnostics as diagnostics
    import normbench.inference as inference
    import normbench.rundir as rundir
    import normbench.runner as runner
    import normbench.train as train
    from normbench.cli import app  # the entry point of `normbench run`

    clock = _Clock()
    clock.wrap(train, "evaluate", "evaluation")
    loop = train.train

    def started(*a, **k):
        clock.loop_start = time.time()
        return loop(*a, **k)

    train.train = started
    clock.wrap(inference, "precise_statistics", "precise_bn")
    # accuracy in eval mode is PreciseBN's; in training mode, the batch statistics'
    clock.wrap(
        inference, "accuracy", None, lambda a: "batch_stats" if a[0].training else "precise_bn"
    )
    clock.wrap(diagnostics.EpochDiagnostics, "__call__", "bn_stats")
    for name in ("write_csv", "write_json", "write_bytes"):
        clock.wrap(runner, name, "writing")
    clock.wrap(rundir.BnStatsLog, "add", "writing")

    try:
        app(["run", "--force", *args.overrides], standalone_mode=False)
    except SystemExit as stop:
        if stop.code:
            raise
    folder = next(Path(args.out).glob("*/runs/*/summary.json"))
    summary = json.loads(folder.read_text())
    clock.seconds["training"] = summary["train_time_s"]
    # a data-parallel run trains in processes of its own: its phases are not seen here
    started = clock.loop_start
    clock.seconds["startup"] = float("nan") if started is None else started - spawned
    print(json.dumps({"seconds": clock.seconds, "summary": summary, "ended": time.time()}))


# --------------------------------------------------------------------------- the parent


def variant_overrides(variant: str) -> list[str]:
    """``norm[:KEY=VALUE...]``: the norm and the variant's own overrides."""
    norm, *extra = variant.split(":")
    return [f"norm={norm}", *extra]


def one_run(norm: str, root: Path, args: argparse.Namespace, tree: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as out:
        overrides = [
            f"out_dir={out}",
            *variant_overrides(norm),
            "model=small_cnn",
            "dataset=mnist",
            f"dataset.root={root}",
            f"batch_size={args.batch_size}",
            f"epochs={args.epochs}",
            "name=overhead",
            *([f"threads={args.threads}"] if args.threads else []),
            *args.override,
        ]
        env = dict(os.environ, RUN_OVERHEAD_SPAWNED=repr(time.time()))
        if tree is not None:  # the other checkout's normbench first
            env["PYTHONPATH"] = os.pathsep.join([tree, env.get("PYTHONPATH", "")])
        spawned = time.time()
        done = subprocess.run(
            [sys.executable, __file__, "--child", "--out", out, "--", *overrides],
            capture_output=True,
            text=True,
            env=env,
        )
        wall = time.time() - spawned
        if done.returncode != 0:
            sys.exit(f"run {norm} failed:\n{done.stderr[-3000:]}")
        line = done.stdout.strip().splitlines()[-1]
        measured = json.loads(line)
    seconds = measured["seconds"]
    seconds["exit"] = spawned + wall - measured["ended"]
    seconds["other"] = wall - sum(v for k, v in seconds.items() if k != "other")
    steps = measured["summary"]["steps"]
    return {
        "norm": norm + ("@before" if tree else ""),
        "wall_s": wall,
        **{f"{k}_s": v for k, v in seconds.items()},
        "run_img_per_s": steps * args.batch_size / wall,
        "train_img_per_s": measured["summary"]["img_per_s"],
        "test_acc": measured["summary"]["final_test_acc"],
    }


def report(rows: list[dict], args: argparse.Namespace) -> str:
    import pandas as pd
    import torch

    frame = pd.DataFrame(rows)
    lines = [
        f"small_cnn, {args.train_images} train / {args.test_images} test 28x28 images, "
        f"batch {args.batch_size}, {args.epochs} epochs, {args.repeats} repeats, "
        f"torch {torch.__version__}, CPU: {cpu_name()}",
        "",
        "median seconds per phase (share of the run's wall time):",
    ]
    labels = [n + tag for tag in ("", "@before")[: 1 + bool(args.before)] for n in args.norms]
    width = max(22, *(len(n) + 2 for n in labels))
    header = f"{'phase':<12}" + "".join(f"{n:>{width}}" for n in labels)
    lines.append(header)
    for phase in ("wall", *PHASES):
        cells = []
        for norm in labels:
            part = frame[frame.norm == norm]
            value = statistics.median(part[f"{phase}_s"])
            share = statistics.median(part[f"{phase}_s"] / part["wall_s"])
            cells.append(f"{value:9.2f} s ({share:6.1%})")
        lines.append(f"{phase:<12}" + "".join(f"{c:>{width}}" for c in cells))
    outside = {n: statistics.median(1 - f.training_s / f.wall_s) for n, f in frame.groupby("norm")}
    accuracy = {n: statistics.median(f.test_acc) for n, f in frame.groupby("norm")}
    lines.append("final test accuracy: " + ", ".join(f"{n} {v:.2%}" for n, v in accuracy.items()))
    lines.append("outside training steps: " + ", ".join(f"{n} {v:.1%}" for n, v in outside.items()))
    pairs = [
        (n + tag, args.norms[-1] + tag)
        for tag in ("", "@before")[: 1 + bool(args.before)]
        for n in args.norms[:-1]
    ]
    if args.before:
        pairs += [(n, n + "@before") for n in args.norms]
    for label, base in pairs:
        for column in ("run_img_per_s", "train_img_per_s"):
            ratios = paired(frame, label, base, column)
            what = "whole run" if column == "run_img_per_s" else "training steps"
            lines.append(
                f"{label}/{base} {what}: median {statistics.median(ratios):.3f}x "
                f"(runs: {', '.join(f'{r:.3f}' for r in ratios)})"
            )
    return "\n".join(lines)


def paired(frame, label: str, base: str, column: str) -> list[float]:
    """``label``'s ``column`` over ``base``'s, per repeat."""
    return [
        frame[(frame.repeat == r) & (frame.norm == label)][column].iloc[0]
        / frame[(frame.repeat == r) & (frame.norm == base)][column].iloc[0]
        for r in sorted(frame.repeat.unique())
    ]


def cpu_name() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    names = (ln.split(":", 1)[1].strip() for ln in text.splitlines() if "Model name" in ln)
    name = next(names, "?")
    flags = next((ln for ln in text.splitlines() if ln.startswith("Flags")), "")
    extra = [f for f in ("avx512_bf16", "amx_bf16") if f in flags.split()]
    return name + (f" ({', '.join(extra)})" if extra else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norms", nargs="+", default=["custom_bn", "torch_bn"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-images", type=int, default=60000)
    parser.add_argument(
        "--digits",
        type=int,
        default=None,
        metavar="COPIES",
        help="learnable images instead of random ones: scikit-learn's digits at 28x28, the "
        "1,437 training images COPIES times (shifted), its 360 test images",
    )
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--override", nargs="*", default=[], help="more KEY=VALUE overrides")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 1 epoch of 512 images, 1 repeat"
    )
    parser.add_argument(
        "--before", default=None, help="another checkout's folder: each variant run on it too"
    )
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.epochs, args.train_images, args.test_images, args.repeats = 1, 512, 256, 1
    rows = []
    with tempfile.TemporaryDirectory() as root:
        if args.digits:
            args.train_images, args.test_images = write_digits(Path(root), args.digits)
        else:
            write_mnist(Path(root), args.train_images, args.test_images)
        trees = [None] + ([str(Path(args.before).resolve())] if args.before else [])
        runs = [(norm, tree) for tree in trees for norm in args.norms]
        for repeat in range(args.repeats):
            for norm, tree in random.Random(repeat).sample(runs, len(runs)):
                rows.append({"repeat": repeat, **one_run(norm, Path(root), args, tree)})
    print(report(rows, args))
    if args.csv:
        import pandas as pd

        pd.DataFrame(rows).to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
