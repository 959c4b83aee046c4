"""``sync_bn``: BatchNorm whose statistics are those of the batch across processes.

In data-parallel training each process holds a slice of the batch, and a local BatchNorm
normalizes over that slice alone. Synchronized BatchNorm (as ``torch.nn.SyncBatchNorm``,
and MegDet's cross-GPU BatchNorm) normalizes over the batch of a group of processes:
``group_size`` consecutive ranks (None: every process; 1: each alone, which is local
BatchNorm). Which batch BatchNorm normalizes over is a study axis of its own (Wu & Johnson
2021, "Rethinking 'Batch' in BatchNorm").

:class:`SyncBatchNorm` is a drop-in for ``torch.nn.SyncBatchNorm`` on normbench's kernel:
the same arguments (``process_group`` included), parameters, buffers and state_dict keys;
the running statistics, unbiased over the whole group's count, are the same on every
rank. Per step it costs one ``all_reduce`` in the forward and one in the backward
(:mod:`normbench.distributed`); in between, the kernel's own passes. Where it synchronizes
with nobody (no process group, one process, ``group_size=1``), and in eval mode, it is
``custom_bn`` exactly.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from normbench import distributed
from normbench.kernels import batch_norm_synced
from normbench.norms.batchnorm import BatchNorm
from normbench.norms.registry import register_norm

__all__ = ["SyncBatchNorm"]


@register_norm("sync_bn")
class SyncBatchNorm(BatchNorm):
    """``torch.nn.SyncBatchNorm`` on normbench's kernel, over ``(N, C, *)`` input.

    ``group_size``: synchronize with groups of that many consecutive ranks (None: all of
    them; it must divide the number of processes); ``process_group``: torch's argument, a
    group to synchronize with instead. ``backend`` and ``relu`` as :class:`BatchNorm`'s.
    """

    @staticmethod
    def norm_batch_size(per_process: int, world: int, kwargs: dict) -> int:
        """The batches of a group of ``group_size`` processes (None: all of them)."""
        return per_process * (kwargs.get("group_size") or world)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device=None,
        dtype=None,
        group_size: int | None = None,
        backend: str = "auto",
        relu: bool = False,
    ) -> None:
        if process_group is not None and group_size is not None:
            raise ValueError("give SyncBatchNorm a process_group or a group_size, not both")
        if group_size is not None:
            distributed.check_group_size(group_size, group_size)  # a whole number >= 1
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            backend=backend, relu=relu,
        )  # fmt: skip
        self.process_group = process_group
        self.group_size = group_size

    def forward(self, input: Tensor) -> Tensor:
        sync = (
            distributed.sync_group(self.group_size, self.process_group) if self.training else None
        )
        if sync is None:  # alone, or eval: normbench's BatchNorm, custom_bn exactly
            return super().forward(input)
        self._check_input_dim(input)
        tracked = self.track_running_stats
        return batch_norm_synced(
            input,
            self.running_mean if tracked else None,
            self.running_var if tracked else None,
            self.num_batches_tracked if tracked else None,
            self.weight,
            self.bias,
            self.momentum,
            self.eps,
            lambda sums: distributed.reduce_sum(sums, sync),
            sync.index,
            sync.size,
            self.backend,
            self.relu,
        )

    def extra_repr(self) -> str:
        group = "" if self.group_size is None else f", group_size={self.group_size}"
        return super().extra_repr() + group
