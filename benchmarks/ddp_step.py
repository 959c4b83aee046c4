"""Where a data-parallel training step's time goes: small_cnn on 2 gloo processes.

Each of the two processes (``torch.multiprocessing``, gloo over the loopback, one thread
each unless ``--threads``) trains its own slice of a global batch (``--batch-size``, 128:
64 images each) of 28x28 random images, channels_last, SGD. It times, interleaved in one
loop (median of ``--repeats`` rounds, each the mean of ``--steps`` steps), the same on
both processes:

- step: a whole step as ``normbench run processes=2`` takes it (the model wrapped by
  :func:`normbench.ddp.wrap`: DistributedDataParallel with normbench's
  communication hook, the loss carried by the gradients' all_reduce, its wait spinning);
- two collectives: the step as runs took it before that hook: DDP's own hook (its wait
  sleeping) and the loss's own all_reduce between forward and backward;
- no_sync: the same step inside DDP's ``no_sync()`` (no gradient all_reduce): the
  computation alone;
- bare: the same step on the model itself, not wrapped in DDP (no DDP hooks; the other
  process runs its own bare steps meanwhile);
- all_reduce: one all_reduce of a float32 buffer the size of the model's gradients
  (DDP puts small_cnn's ~94k parameters in one bucket), alone.

``step - no_sync`` is what the gradient reduction adds to a step where it runs (including
waiting for the other process); set beside ``all_reduce`` alone it says how much of it is
the collective itself. With ``--norm sync_bn`` the step also holds the BatchNorm layers'
own collectives (two per layer, in ``no_sync`` too).

Usage: python benchmarks/ddp_step.py [--norm custom_bn] [--batch-size 128] [--repeats 7]
       [--steps 20] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import statistics

from run_overhead import cpu_name
from sync_bn import WORLD, join_gloo, mean_seconds, run_ranks


def worker(rank: int, port: int, args: argparse.Namespace, results) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from normbench import ddp
    from normbench.models import build_model, set_memory_format
    from normbench.norms import NormSpec

    join_gloo(rank, port, args.threads)
    torch.manual_seed(0)  # the same initial model on both (DDP checks it)
    model = build_model("small_cnn", NormSpec(args.norm, {}), 1, 10, (28, 28))
    set_memory_format(model, "channels_last")
    net, reduction = ddp.wrap(model, "cpu")
    before = DistributedDataParallel(model)  # torch's own hook
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    per_process = args.batch_size // WORLD
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(per_process, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (per_process,), generator=g)
    numel = sum(p.numel() for p in model.parameters())
    flat = torch.zeros(numel)

    def step():
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        reduction.loss = loss.detach() * len(y)
        loss.backward()
        reduction.finish()
        optimizer.step()

    def two_collectives():
        loss = F.cross_entropy(before(x), y)
        both = torch.tensor([loss.item() * len(y)], dtype=torch.float64)
        dist.all_reduce(both)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def no_sync():
        with before.no_sync():
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(before(x), y).backward()
            optimizer.step()

    def bare():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    cases = {
        "step": step,
        "two_collectives": two_collectives,
        "no_sync": no_sync,
        "bare": bare,
        "all_reduce": lambda: dist.all_reduce(flat),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm-up
        mean_seconds(fn, 3)
    for _ in range(args.repeats):
        for name, fn in cases.items():  # the same order on both processes
            dist.barrier()
            times[name].append(mean_seconds(fn, args.steps))
    medians = {name: statistics.median(values) for name, values in times.items()}
    results.put((rank, (medians, numel)))
    dist.destroy_process_group()


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norm", default="custom_bn")
    parser.add_argument("--batch-size", type=int, default=128, help="the global batch")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="batch 8, 2 repeats of 2 steps")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.repeats, args.steps = 8, 2, 2
    if args.batch_size % WORLD:
        parser.error(f"--batch-size must divide by {WORLD}")
    ranks = run_ranks(worker, args)
    got = {rank: medians for rank, (medians, _) in ranks.items()}
    numel = ranks[0][1]
    # the slower process's figure: the step waits on it
    t = {name: max(got[0][name], got[1][name]) for name in got[0]}
    added = t["step"] - t["no_sync"]
    print(
        f"{WORLD} gloo processes x {args.threads} thread(s), small_cnn with {args.norm}, "
        f"global batch {args.batch_size}, channels_last, median of {args.repeats} x "
        f"{args.steps} steps, torch {torch.__version__}, CPU: {cpu_name()}"
    )
    print(f"step (DDP)             {t['step'] * 1e3:8.2f} ms")
    print(f"two collectives (old)  {t['two_collectives'] * 1e3:8.2f} ms")
    print(f"no_sync (computation)  {t['no_sync'] * 1e3:8.2f} ms")
    print(f"bare (no DDP)          {t['bare'] * 1e3:8.2f} ms")
    print(f"gradient reduction     {added * 1e3:8.2f} ms ({added / t['step']:.1%} of the step)")
    print(f"all_reduce alone       {t['all_reduce'] * 1e3:8.2f} ms ({numel:,} float32)")
    print(f"images/s               {args.batch_size / t['step']:8.0f}")


if __name__ == "__main__":
    main()
