"""Normalization variants, each registered under its config name.

Importing this package registers every variant (``custom_bn``, ``torch_bn``,
``layer``, ``instance``, ``group``, ``batch_renorm``, ``ghost_bn``, ``none``);
models get their layers through :class:`NormSpec`. Adding a variant is one
module here with a ``@register_norm`` class, one import line below, and one
``normbench/conf/norm/<name>.yaml``.

Every variant takes ``(num_channels, **kwargs)`` and channels-first
``(N, C, *)`` input. Class attributes read by :class:`NormSpec`: ``centers``
(default True: the layer subtracts a mean, so a bias before it is redundant) and
``needs_spatial`` (default False).

``BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d`` are drop-in replacements for
torch's, on normbench's kernel.
"""

from normbench.norms.registry import NormSpec, get_norm, norm_names, register_norm  # noqa: I001

# registration order is the order ``norm_names()`` lists them in
from normbench.norms.batchnorm import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    TorchBatchNorm,
)
from normbench.norms.groupnorm import GroupNorm, InstanceNorm, LayerNorm, group_count
from normbench.norms.batchrenorm import BatchRenorm, BatchRenorm2d
from normbench.norms.ghostbn import GhostBatchNorm
from normbench.norms.identity import NoNorm

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm",
    "BatchRenorm2d",
    "GhostBatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "NoNorm",
    "NormSpec",
    "TorchBatchNorm",
    "get_norm",
    "group_count",
    "norm_names",
    "register_norm",
]
