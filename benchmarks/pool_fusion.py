"""custom_bn's norm, ReLU and 2x2 max-pooling in one layer against the same three in a row.

One training step (forward and backward) of small_cnn's two pooled layers at batch 128
(channels_last float32, the CPU kernel): ``BatchNorm2d(C, relu=True, pool=True)``, whose
CPU operators write the pooled output and take the pooled gradient (docs/kernel.md), against
``BatchNorm2d(C, relu=True)`` followed by ``F.max_pool2d`` (what every other layout and
dtype runs), and against torch's ``nn.BatchNorm2d``, ``nn.ReLU`` and ``nn.MaxPool2d`` (what
``torch_bn`` runs). The three alternate within each repeat, in one process (the machine's
speed drifts); the medians and the ratios to the fused layer are printed, with the CPU.

``--dtype bfloat16`` (or ``float16``) times the layers on that input with float32 parameters,
as ``precision=bf16`` hands them the convolutions' output under autocast.

Usage: python benchmarks/pool_fusion.py [--repeats 30] [--batch-size 128] [--dtype float32]
       [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from run_overhead import cpu_name  # this folder's: the script's own is on sys.path
from torch import nn

from normbench.allocator import keep_freed_memory
from normbench.norms import BatchNorm2d


def layers(channels: int) -> dict[str, nn.Module]:
    class Composed(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = BatchNorm2d(channels, relu=True)

        def forward(self, x):
            return F.max_pool2d(self.norm(x), 2)

    return {
        "fused": BatchNorm2d(channels, relu=True, pool=True),
        "composed": Composed(),
        "torch": nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.MaxPool2d(2)),
    }


def step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    x = x.detach().requires_grad_()
    start = time.perf_counter()
    layer(x).backward(grad)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--dtype", choices=["float32", "float64", "bfloat16", "float16"], default="float32"
    )
    parser.add_argument("--quick", action="store_true", help="3 repeats of batch 8")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.batch_size = 3, 8
    keep_freed_memory()  # as a run has it (normbench.allocator)
    dtype = getattr(torch, args.dtype)
    print(
        f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{args.dtype} input"
    )
    for channels, size in ((32, 28), (64, 14)):
        shape = (args.batch_size, channels, size, size)
        x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
        grad = torch.randn(shape[0], channels, size // 2, size // 2).to(dtype)
        grad = grad.contiguous(memory_format=torch.channels_last)
        candidates = layers(channels)
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(2):  # warm-up: the kernel's build and first allocations
            for layer in candidates.values():
                step(layer, x, grad)
        for _ in range(args.repeats):
            for name, layer in candidates.items():
                times[name].append(step(layer, x, grad))
        medians = {name: statistics.median(t) for name, t in times.items()}
        fused = medians["fused"]
        print(
            f"{'x'.join(map(str, shape))}: "
            + ", ".join(
                f"{name} {1e3 * t:.2f} ms ({t / fused:.2f}x the fused layer's)"
                for name, t in medians.items()
            )
        )


if __name__ == "__main__":
    main()
