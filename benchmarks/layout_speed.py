"""Training-step time of each normalization variant in both memory layouts.

For every variant, one model in ``contiguous`` and one in ``channels_last``
(``normbench.models.set_memory_format``, as ``memory_format=`` does in a run), each
trained on the same random batch with SGD; their steps interleaved in one process, the
variants in a shuffled order each repeat, so the machine's drift reaches all alike.
Reports each layout's median step time and the median of the per-repeat ratios
(contiguous over channels_last: above 1, channels_last is faster), next to whether
``memory_format=auto`` picks channels_last for the variant on the CPU.

Usage: python benchmarks/layout_speed.py [--model small_cnn] [--batch-size 128]
       [--image-size 28] [--channels 1] [--norms custom_bn torch_bn ...] [--repeats 10]
       [--threads N]   (torch.set_num_threads; default: torch's, every core)
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from normbench.config import LAYOUTS
from normbench.models import build_model, choose_memory_format, set_memory_format
from normbench.norms import NormSpec, norm_names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--norms", nargs="+", default=None, help="default: every variant")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    norms = args.norms or norm_names()

    torch.manual_seed(0)
    size = (args.image_size, args.image_size)
    x = torch.randn(args.batch_size, args.channels, *size)
    y = torch.randint(0, 10, (args.batch_size,))
    models = {}
    for norm in norms:
        for layout in LAYOUTS:
            torch.manual_seed(0)
            model = build_model(args.model, NormSpec(norm), args.channels, 10, size)
            set_memory_format(model, layout)
            models[norm, layout] = (model, torch.optim.SGD(model.parameters(), lr=0.01))

    def step(key) -> float:
        model, optimizer = models[key]
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        return time.perf_counter() - start

    for key in models:  # warm-up: kernels built, caches and allocator primed
        step(key)
        step(key)
    times = {key: [] for key in models}
    rng = random.Random(0)
    for _ in range(args.repeats):
        for norm in rng.sample(norms, len(norms)):
            for layout in rng.sample(LAYOUTS, 2):
                times[norm, layout].append(step((norm, layout)))

    table = Table(
        title=f"{args.model}, {args.channels}x{args.image_size}x{args.image_size}, "
        f"batch {args.batch_size}, {torch.get_num_threads()} threads, {args.repeats} repeats"
    )
    for column in ("norm", "contiguous ms", "channels_last ms", "ratio", "auto (CPU)"):
        table.add_column(column, justify="right", no_wrap=True)
    for norm in norms:
        first, last = times[norm, "contiguous"], times[norm, "channels_last"]
        ratio = statistics.median(a / b for a, b in zip(first, last, strict=True))
        probe = models[norm, "contiguous"][0]
        auto = choose_memory_format("auto", "cpu", probe, NormSpec(norm))
        table.add_row(
            norm,
            f"{statistics.median(first) * 1e3:.2f}",
            f"{statistics.median(last) * 1e3:.2f}",
            f"{ratio:.3f}x",
            auto,
        )
    table.caption = "ratio: the median over repeats of contiguous's step time over channels_last's"
    Console().print(table)


if __name__ == "__main__":
    main()
