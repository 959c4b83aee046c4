"""Normalization variants, each registered under its config name.

Every variant (``custom_bn``, ``torch_bn``, ``layer``, ``instance``, ``group``,
``batch_renorm``, ``ghost_bn``, ``sync_bn``, ``none``, ``frn``, ``rms``, ``evonorm_s0``) is
registered the first time the registry is asked for one, or one of the names below is used: the
variants import torch, and a command that only composes configs (a sweep with nothing
to run) must not. Models get their layers through :class:`NormSpec`. Adding a variant is
one module here with a ``@register_norm`` class, one entry in
``normbench.norms.registry.VARIANTS``, and one ``normbench/conf/norm/<name>.yaml``.

Every variant takes ``(num_channels, **kwargs)`` and channels-first
``(N, C, *)`` input. Class attributes read by :class:`NormSpec`: ``centers``
(default True: the layer subtracts a mean, so a bias before it is redundant),
``needs_spatial`` (default False) and ``carries_activation`` (default False: models put
a ReLU after the layer; True for variants with their own, as ``frn`` and ``evonorm_s0``).

``BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d`` and ``SyncBatchNorm`` are drop-in
replacements for torch's, on normbench's kernel.
"""

from __future__ import annotations

import sys
from typing import Any

from normbench.norms.registry import (
    VARIANTS,
    NormSpec,
    get_norm,
    load_variants,
    norm_names,
    register_norm,
)


def __getattr__(name: str) -> Any:
    for module, names in VARIANTS.items():
        if name in names:
            load_variants()
            value = getattr(sys.modules[f"{__name__}.{module}"], name)
            globals()[name] = value
            return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "SyncBatchNorm",
    "TorchBatchNorm",
    "get_norm",
    "group_count",
    "norm_names",
    "register_norm",
]
