"""Training speed of whole runs per normalization variant: is custom_bn as fast as torch_bn?

Runs ``normbench run``'s code path (``runner.run``) for each variant and batch size,
interleaved repeat after repeat, and reports the median training images per
second (the loop's own measurement: training steps only) and the ratio to the
first variant.

``--synthetic-mnist N`` trains on MNIST-sized inputs (28x28) without the data set: N
random images (and N // 6 test images) written as MNIST's IDX files into a temporary
folder, read by torchvision's own MNIST loader (``dataset=mnist``). The speed of a step
does not depend on what the pixels show.

Usage: python benchmarks/norm_speed.py [--norms custom_bn torch_bn] [--batch-sizes 128 8]
       [--dataset digits] [--model small_cnn] [--epochs 3] [--repeats 5] [--csv out.csv]
       [--synthetic-mnist 6000] [--override KEY=VALUE ...]   (more Hydra overrides)
"""

from __future__ import annotations

import argparse
import struct
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from normbench.config import compose
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
                for norm in args.norms:
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
                        ]
                    )
                    summary = run(cfg, force=True).summary
                    rows.append(
                        {
                            "repeat": repeat,
                            "batch_size": batch_size,
                            "norm": norm,
                            "img_per_s": summary["img_per_s"],
                            "final_test_acc": summary["final_test_acc"],
                        }
                    )
    frame = pd.DataFrame(rows)
    medians = frame.groupby(["batch_size", "norm"]).median(numeric_only=True)
    table = Table(
        title=f"{args.model} on {args.dataset}, {args.epochs} epochs, "
        f"median of {args.repeats} interleaved runs"
    )
    for column in ("batch size", "norm", "train img/s", f"vs {args.norms[0]}", "test acc"):
        table.add_column(column, justify="right")
    for batch_size in args.batch_sizes:
        base = medians.loc[(batch_size, args.norms[0]), "img_per_s"]
        for norm in args.norms:
            row = medians.loc[(batch_size, norm)]
            table.add_row(
                str(batch_size),
                norm,
                f"{row.img_per_s:,.0f}",
                f"{row.img_per_s / base:.3f}x",
                f"{row.final_test_acc:.3f}",
            )
    Console().print(table)
    if args.csv:
        frame.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
