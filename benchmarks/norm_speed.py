"""Training speed of whole runs per normalization variant: is custom_bn as fast as torch_bn?

Runs ``normbench run``'s code path (``runner.run``) for each variant and batch size,
interleaved repeat after repeat (the variants in a shuffled order each time, so none
always runs first), and reports the median training images per second (the loop's own
measurement: training steps only) and the ratio to the first variant: the median, and
the quartiles, of the ratios within a repeat. On a shared machine the speed of whole
runs drifts by tens of percent from one to the next; a ratio of two runs taken one
after the other moves less than the ratio of two medians.

``--synthetic-mnist N`` trains on MNIST-sized inputs (28x28) without the data set: N
random images (and N // 6 test images) written as MNIST's IDX files into a temporary
folder, read by torchvision's own MNIST loader (``dataset=mnist``). The speed of a step
does not depend on what the pixels show.

A variant may carry settings for its runs only, ``custom_bn:NAME=VALUE`` (more with more
colons): an upper-case NAME is an environment variable, e.g.
``custom_bn:NORMBENCH_KERNEL_STREAM_BYTES=0`` to time the kernel's settings against each
other in one process (the kernel reads those variables on every call; not
``NORMBENCH_KERNEL_ISA``, which picks its build once per process); any other NAME is a
config key, e.g. ``torch_bn:memory_format=contiguous`` to time the layouts interleaved.

Usage: python benchmarks/norm_speed.py [--norms custom_bn torch_bn] [--batch-sizes 128 8]
       [--dataset digits] [--model small_cnn] [--epochs 3] [--repeats 5] [--csv out.csv]
       [--synthetic-mnist 6000] [--override KEY=VALUE ...]   (more Hydra overrides)
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import tempfile
from contextlib import AbstractContextManager
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from normbench.config import compose
from normbench.kernels.cpu import ISA_ENV
from normbench.runner import run


def write_synthetic_mnist(root: Path, n_train: int, seed: int = 0) -> None:
    """Random 28x28 images and labels in MNIST's IDX format, where torchvision looks."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", max(n_train // 6, 10))):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        for name, magic, array in (("images-idx3", 0x803, images), ("labels-idx1", 0x801, labels)):
            header = struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in array.shape)
            (raw / f"{prefix}-{name}-ubyte").write_bytes(header + array.tobytes())


def with_ratios(frame: pd.DataFrame, base: str) -> pd.DataFrame:
    """``frame`` (a row per run: ``repeat``, ``batch_size``, ``norm``, ``img_per_s``) with
    ``ratio``: each run's images per second over variant ``base``'s in the same repeat and
    batch size."""
    runs = frame[frame["norm"] == base].set_index(["repeat", "batch_size"])["img_per_s"]
    keys = list(zip(frame["repeat"], frame["batch_size"], strict=True))
    return frame.assign(ratio=frame["img_per_s"].to_numpy() / runs.loc[keys].to_numpy())


def split_variant(variant: str) -> tuple[str, dict[str, str], list[str]]:
    """``norm:NAME=VALUE:...`` as the norm, the environment variables its runs set (the
    upper-case NAMEs) and its config overrides (the others)."""
    norm, *settings = variant.split(":")
    env, overrides = {}, []
    for setting in settings:
        name, sep, value = setting.partition("=")
        if not sep or not name:
            raise SystemExit(f"{variant!r}: expected norm:NAME=VALUE, got {setting!r}")
        if name == ISA_ENV:
            raise SystemExit(
                f"{variant!r}: {ISA_ENV} picks the kernel's build, once per process; set it "
                f"for the whole invocation ({ISA_ENV}={value} python benchmarks/norm_speed.py ...)"
            )
        if name.isupper():
            env[name] = value
        else:
            overrides.append(setting)
    return norm, env, overrides


def environment(env: dict[str, str]) -> AbstractContextManager:
    """``env`` set in ``os.environ`` for a ``with`` block, the earlier values restored after
    it."""
    return mock.patch.dict(os.environ, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norms", nargs="+", default=["torch_bn", "custom_bn"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 8])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--synthetic-mnist", type=int, default=None, metavar="N")
    parser.add_argument("--override", nargs="*", default=[], help="more Hydra overrides")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as out:
        if args.synthetic_mnist:
            write_synthetic_mnist(Path(out) / "data", args.synthetic_mnist)
            args.dataset = "mnist"
            args.override = [f"dataset.root={Path(out) / 'data'}", *args.override]
        for repeat in range(args.repeats):
            for batch_size in args.batch_sizes:
                norms = list(args.norms)
                random.Random(f"{repeat} {batch_size}").shuffle(norms)
                for variant in norms:
                    norm, env, overrides = split_variant(variant)
                    cfg = compose(
                        [
                            f"out_dir={out}",
                            f"norm={norm}",
                            f"model={args.model}",
                            f"dataset={args.dataset}",
                            f"batch_size={batch_size}",
                            f"epochs={args.epochs}",
                            f"seed={repeat}",
                            *args.override,
                            *overrides,
                        ]
                    )
                    with environment(env):
                        summary = run(cfg, force=True).summary
                    rows.append(
                        {
                            "repeat": repeat,
                            "batch_size": batch_size,
                            "norm": variant,
                            "img_per_s": summary["img_per_s"],
                            "final_test_acc": summary["final_test_acc"],
                        }
                    )
    frame = with_ratios(pd.DataFrame(rows), args.norms[0])
    groups = frame.groupby(["batch_size", "norm"])
    medians = groups.median(numeric_only=True)
    q1, q3 = groups["ratio"].quantile(0.25), groups["ratio"].quantile(0.75)
    table = Table(
        title=f"{args.model} on {args.dataset}, {args.epochs} epochs, "
        f"median of {args.repeats} interleaved runs"
    )
    columns = ("batch size", "norm", "train img/s", "ratio", "quartiles", "test acc")
    for column in columns:
        # a variant's settings make long names: fold them, never the figures
        wrap = {"overflow": "fold"} if column == "norm" else {"no_wrap": True}
        table.add_column(column, justify="right", **wrap)
    for batch_size in args.batch_sizes:
        for norm in args.norms:
            row = medians.loc[(batch_size, norm)]
            table.add_row(
                str(batch_size),
                norm,
                f"{row.img_per_s:,.0f}",
                f"{row.ratio:.3f}x",
                f"{q1[(batch_size, norm)]:.3f}-{q3[(batch_size, norm)]:.3f}",
                f"{row.final_test_acc:.3f}",
            )
    table.caption = (
        f"ratio: the median of each run's images per second over {args.norms[0]}'s in "
        "the same repeat; quartiles: of those ratios"
    )
    Console().print(table)
    if args.csv:
        frame.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
