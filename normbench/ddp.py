"""A data-parallel run's training step on torch.distributed: the model in
DistributedDataParallel with normbench's gradient reduction, one collective a step
(:class:`StepReduction`, :func:`wrap`), and the sums the loop adds over the processes
(:func:`all_sum`). The processes, their group and their start are
:mod:`normbench.distributed`'s.

torch is imported inside the functions, as in :mod:`normbench.distributed`.
"""

from __future__ import annotations

from typing import Any

from normbench.distributed import finish

__all__ = ["StepReduction", "all_sum", "wrap"]


class StepReduction:
    """DistributedDataParallel's gradient reduction, carrying the rest of the step: one
    collective a step where there were three. DDP's default broadcasts rank 0's buffers
    before each forward and, with the loss's own all_reduce between forward and
    backward, that made every step wait three times for the slower process (2 processes
    on 2 cores: benchmarks/README.md).

    The last bucket DDP reduces (the first layers' gradients, under DDP's 1 MiB first
    bucket) goes as float64, with two more parts: the step's loss summed over this
    process's images (:attr:`loss`, set before backward: a tensor, no ``.item()``), and
    rank 0's buffers (zeros from every other rank: adding zeros rounds nothing, and
    float64 holds float32 statistics and integer step counts exactly). After backward
    :meth:`finish` puts rank 0's buffers into every rank's model and gives the global
    batch's loss, the same on every rank.

    Rank 1's buffers at its next forward are then rank 0's after this step, what DDP's
    broadcast at that forward would give; and between steps (an epoch's evaluation, the
    checkpoint) every rank holds the same model, which DDP's broadcast left each rank's
    last forward to change. Gradients are averaged over the processes as DDP's own hook
    averages them; in float64 the sum is rounded once, to the same float32 on every rank."""

    def __init__(self, buffers: list[Any], rank: int, world: int, spin: bool) -> None:
        self.rank, self.world, self.spin = rank, world, spin
        self.buffers = buffers
        self.loss: Any = None
        self._reduced: Any = None  # the last bucket's extra parts, summed

    # No annotations: DDP refuses a hook whose ``bucket`` is annotated other than as
    # dist.GradBucket, and under ``from __future__ import annotations`` that is a string
    def hook(self, state, bucket):  # noqa: ANN001, ANN201
        """DDP's communication hook (``register_comm_hook``): one bucket's all_reduce."""
        import torch
        import torch.distributed as dist

        grads = bucket.buffer()
        if not bucket.is_last():
            work = dist.all_reduce(grads, async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0].div_(self.world))
        if self.loss is None:
            raise RuntimeError("StepReduction: backward without the step's loss set")
        wide = torch.float64
        parts = [grads.to(wide), self.loss.detach().to(wide).reshape(1)]
        for buffer in self.buffers:
            own = buffer.detach().reshape(-1)
            parts.append(own.to(wide) if self.rank == 0 else own.new_zeros(own.shape, dtype=wide))
        flat = torch.cat(parts)
        self.loss = None
        count = grads.numel()

        def split(summed: Any) -> Any:
            self._reduced = summed[count:]
            return summed[:count].div_(self.world).to(grads.dtype)

        work = dist.all_reduce(flat, async_op=True)
        if self.spin:  # backward has nothing left to do meanwhile: wait for it here
            finish(work, True)
            done = torch.futures.Future()
            done.set_result(split(flat))
            return done
        return work.get_future().then(lambda fut: split(fut.value()[0]))

    def finish(self) -> float:
        """After backward: rank 0's buffers into this process's model; the step's loss
        summed over the global batch."""
        import torch

        if self._reduced is None:
            raise RuntimeError("StepReduction: no backward reduced this step's loss")
        reduced, self._reduced = self._reduced, None
        with torch.no_grad():
            at = 1
            for buffer in self.buffers:
                n = buffer.numel()
                buffer.copy_(reduced[at : at + n].view(buffer.shape))
                at += n
        return float(reduced[0])


def wrap(model: Any, device: str) -> tuple[Any, StepReduction]:
    """``model`` as DistributedDataParallel with normbench's gradient reduction
    (:class:`StepReduction`, returned with it): gradients averaged over the processes
    in buckets as backward goes, the last with the loss and rank 0's buffers. The buffers
    are rank 0's once here, as DDP's own start makes them."""
    import inspect

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.cuda.current_device()] if device == "cuda" else None
    buffers = list(model.buffers())
    if any(b.is_complex() for b in buffers):  # float64 cannot carry it: DDP's broadcasts
        net, buffers = DistributedDataParallel(model, device_ids=ids), []
    elif "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        # no broadcast before each forward; still the one at the start
        net = DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
    else:  # a torch without that option: broadcast_buffers=False drops the start's too
        for buffer in buffers:
            dist.broadcast(buffer, 0)
        net = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    reduction = StepReduction(buffers, dist.get_rank(), dist.get_world_size(), device == "cpu")
    net.register_comm_hook(None, reduction.hook)
    return net, reduction


def all_sum(values: list[float], device: Any) -> list[float]:
    """``values`` added over every process (float64, one ``all_reduce``); as they are
    where there is no process group."""
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return list(values)
    both = torch.tensor(values, dtype=torch.float64, device=device)
    finish(dist.all_reduce(both, async_op=True), both.device.type == "cpu")
    return both.tolist()
