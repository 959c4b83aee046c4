"""Does normbench's training loop cost anything over a plain PyTorch loop?

Trains ``small_cnn`` with torch's BatchNorm at one batch size twice per repeat,
interleaved: once through ``normbench.runner.run`` (the code path of
``normbench run``: config, progress callbacks, per-epoch evaluation, metrics
files) and once with a bare loop written here from scratch (``nn.BatchNorm2d``,
``torch.randperm`` batches over the same in-memory tensors, SGD, nothing else).

Two figures per side, medians over the repeats:
- train img/s: training images per second of training time (the loop's own
  measurement for normbench, ``time.perf_counter`` around the steps for the
  bare loop);
- end-to-end img/s: training images per wall-clock second of training plus an
  evaluation on the test split after every epoch (both sides do that work);
  normbench's figure also covers its progress callbacks and the metrics file it
  rewrites after every epoch (its summary's ``wall_time_s``; loading the data
  and building the model are left out on both sides).

Usage: python benchmarks/loop_overhead.py [--dataset digits] [--batch-size 128]
       [--epochs 10] [--repeats 5] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from normbench.config import compose
from normbench.data import load_dataset
from normbench.runner import run


def plain_small_cnn(in_channels: int, num_classes: int) -> nn.Module:
    """DESIGN.md's small_cnn written out with torch's own layers."""

    def block(cin, cout, pool):
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        return layers + ([nn.MaxPool2d(2)] if pool else [])

    return nn.Sequential(
        *block(in_channels, 32, True),
        *block(32, 64, True),
        *block(64, 128, False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


def plain_loop(data, batch_size: int, epochs: int, lr: float, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    model = plain_small_cnn(data.in_channels, data.num_classes)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    x, y = data.train_x, data.train_y
    steps = len(y) // batch_size
    train_time = 0.0
    wall = time.perf_counter()
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(y))
        for step in range(steps):
            index = order[step * batch_size : (step + 1) * batch_size]
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        train_time += time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            acc = (model(data.test_x).argmax(1) == data.test_y).float().mean().item()
    wall = time.perf_counter() - wall
    images = epochs * steps * batch_size
    return {"train_img_s": images / train_time, "e2e_img_s": images / wall, "test_acc": acc}


def normbench_run(dataset: str, batch_size: int, epochs: int, lr: float, seed: int):
    with tempfile.TemporaryDirectory() as out:
        cfg = compose(
            [
                f"out_dir={out}",
                "norm=torch_bn",
                "model=small_cnn",
                f"dataset={dataset}",
                f"batch_size={batch_size}",
                f"epochs={epochs}",
                f"lr={lr}",
                f"seed={seed}",
                "schedule.name=constant",
            ]
        )
        summary = run(cfg, force=True).summary
    images = summary["steps"] * batch_size
    return {
        "train_img_s": summary["img_per_s"],
        "e2e_img_s": images / summary["wall_time_s"],
        "test_acc": summary["final_test_acc"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args()

    data = load_dataset(args.dataset)
    rows = []
    for repeat in range(args.repeats):
        for side in ("plain", "normbench"):
            if side == "plain":
                measured = plain_loop(data, args.batch_size, args.epochs, args.lr, repeat)
            else:
                measured = normbench_run(
                    args.dataset, args.batch_size, args.epochs, args.lr, repeat
                )
            rows.append({"repeat": repeat, "side": side, **measured})

    frame = pd.DataFrame(rows)
    medians = frame.groupby("side")[["train_img_s", "e2e_img_s", "test_acc"]].median()
    table = Table(
        title=f"small_cnn + torch_bn on {args.dataset}, batch {args.batch_size}, "
        f"{args.epochs} epochs, median of {args.repeats}, {torch.get_num_threads()} threads"
    )
    for column in ("", "train img/s", "end-to-end img/s", "test acc"):
        table.add_column(column, justify="right")
    for side in ("plain", "normbench"):
        row = medians.loc[side]
        table.add_row(
            side, f"{row.train_img_s:,.0f}", f"{row.e2e_img_s:,.0f}", f"{row.test_acc:.3f}"
        )
    ratio = medians.loc["normbench"] / medians.loc["plain"]
    table.add_row("normbench / plain", f"{ratio.train_img_s:.3f}x", f"{ratio.e2e_img_s:.3f}x", "")
    Console().print(table)
    spread = frame.groupby("side").train_img_s.agg(lambda s: statistics.pstdev(s) / s.mean())
    Console().print(f"train img/s spread (std/mean): {spread.to_dict()}")
    if args.csv:
        frame.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
