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

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

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
    group to synchronize with instead. ``backend``, ``relu`` and ``pool`` as
    :class:`BatchNorm`'s (synchronized, the pooling follows the normalization; alone, the
    kernel fuses it, so that one process runs custom_bn's very passes).
    """

    #: Models hand it the 2x2 max-pooling after it, as custom_bn (NormSpec.fuses_pool).
    fuses_pool = True

    @staticmethod
    def norm_batch_size(per_process: int, world: int, kwargs: dict) -> int:
        """The batches of a group of ``group_size`` processes (None: all of them)."""
        return per_process * (kwargs.get("group_size") or world)

    @staticmethod
    def local_batch(per_process: int, world: int, kwargs: dict) -> int:
        """The batch a copy of the layer takes in one process, synchronizing with nobody,
        to normalize over what its group does together: the group's batches (a
        ``group_size`` that does not divide ``world`` is one UserError line)."""
        return per_process * distributed.check_group_size(kwargs.get("group_size"), world)

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
        pool: bool = False,
        *,
        bias: bool = True,
    ) -> None:
        if process_group is not None and group_size is not None:
            raise ValueError("give SyncBatchNorm a process_group or a group_size, not both")
        if group_size is not None:
            distributed.check_group_size(group_size, group_size)  # a whole number >= 1
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            backend=backend, relu=relu, pool=pool, bias=bias,
        )  # fmt: skip
        self.process_group = process_group
        self.group_size = group_size

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """``module`` with every BatchNorm layer in it (a subclass of torch's ``_BatchNorm``:
        torch's ``BatchNorm*d`` and ``SyncBatchNorm``, normbench's) replaced by this class,
        as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does: the same parameters and
        buffers (shared, not copied), mode and ``qconfig``; normbench's ``backend`` and
        fused ``relu`` and ``pool`` carried over.
        Returns the new layer where ``module`` is one."""
        out = module
        if isinstance(module, _BatchNorm):
            out = cls(
                module.num_features, module.eps, module.momentum, module.affine,
                module.track_running_stats, process_group,
                backend=getattr(module, "backend", "auto"),
                relu=bool(getattr(module, "relu", False)),
                pool=bool(getattr(module, "pool", False)),
                bias=module.bias is not None or not module.affine,
            )  # fmt: skip
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out

    def forward(self, input: Tensor) -> Tensor:
        sync = (
            distributed.sync_group(self.group_size, self.process_group) if self.training else None
        )
        if sync is None:  # alone, or eval: normbench's BatchNorm, custom_bn exactly
            return super().forward(input)
        if self.pool:
            self._check_pool_input(input)
        else:
            self._check_input_dim(input)
        tracked = self.track_running_stats
        y = batch_norm_synced(
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
        # the pooling after the group's normalization (alone, the kernel fuses it)
        return F.max_pool2d(y, 2) if self.pool else y

    def extra_repr(self) -> str:
        group = "" if self.group_size is None else f", group_size={self.group_size}"
        return super().extra_repr() + group
