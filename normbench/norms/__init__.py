"""Normalization variants, each registered under its config name.

Importing this package registers every variant (``custom_bn``, ``torch_bn``,
``layer``, ``instance``, ``group``, ``batch_renorm``, ``ghost_bn``, ``none``, ``frn``,
``rms``, ``evonorm_s0``);
models get their layers through :class:`NormSpec`. Adding a variant is one
module here with a ``@register_norm`` class, one import line below, and one
``normbench/conf/norm/<name>.yaml``.

Every variant takes ``(num_channels, **kwargs)`` and channels-first
``(N, C, *)`` input. Class attributes read by :class:`NormSpec`: ``centers``
(default True: the layer subtracts a mean, so a bias before it is redundant),
``needs_spatial`` (default False) and ``carries_activation`` (default False: models put
a ReLU after the layer; True for variants with their own, as ``frn`` and ``evonorm_s0``).

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
from normbench.norms.frn import FilterResponseNorm
from normbench.norms.rmsnorm import RMSNorm
from normbench.norms.evonorm import EvoNormS0

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm",
    "BatchRenorm2d",
    "EvoNormS0",
    "FilterResponseNorm",
    "GhostBatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "NoNorm",
    "NormSpec",
    "RMSNorm",
    "TorchBatchNorm",
    "get_norm",
    "group_count",
    "norm_names",
    "register_norm",
]
