"""normbench's BatchNorm kernel.

- :mod:`~normbench.kernels.reference`: the specification, in plain torch
  operations (forward in training and eval, hand-derived backward, the
  running-statistics update); every faster kernel is tested against it.
- :mod:`~normbench.kernels.cpu`: the fused C++/OpenMP kernel (``batchnorm_cpu.cpp``),
  compiled at first use and cached.
- :mod:`~normbench.kernels.triton_launch`: the Triton kernel for CUDA, the API of
  ``reference`` (launch planning and launches); its device code, the ``@triton.jit``
  kernels, is :mod:`~normbench.kernels.triton_kernels`.
- :mod:`~normbench.kernels.ops`: the ``normbench::`` torch operators (defined in C++
  with their CPU kernels and autograd; fakes and the Triton CUDA kernels registered
  in Python), and the ``reference`` backend's plain torch path.
- :mod:`~normbench.kernels.checks`: the operators' argument checks (the C++ kernel's own,
  in Python) for the Triton kernels and the fake implementations, and torch's
  ``F.batch_norm`` contract for the paths that reach no operator.
- :mod:`~normbench.kernels.function`: the functional :func:`batch_norm`, a
  drop-in for ``torch.nn.functional.batch_norm``, and :func:`batch_norm_tracked`,
  the training forward of ``torch.nn.BatchNorm*d`` (batch counter included), and
  :func:`batch_norm_synced`, that of a batch spread across processes (synchronized
  BatchNorm: the reductions are the caller's, :mod:`normbench.distributed`'s).

Imports go one way, down: ``function`` -> ``ops`` -> ``cpu`` | ``triton_launch`` ->
``triton_kernels`` -> ``checks`` | ``reference`` (``cpu`` and ``triton_launch`` import
neither each other nor ``ops``; ``checks`` and ``reference`` import nothing here).

Normalization layers call these (or :func:`batch_norm_train` when they need the
batch statistics) and never a kernel directly, so swapping a kernel touches
nothing above this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from normbench.kernels.function import (
        batch_norm,
        batch_norm_relu_pool,
        batch_norm_stats,
        batch_norm_synced,
        batch_norm_tracked,
        batch_norm_train,
    )
    from normbench.kernels.ops import BACKENDS, relu_pool_applies, resolve_backend

# Imported on first use (PEP 562), not with the package: the package's torch-free modules
# (``cpu.check_environment``, which every command that trains calls first) then import
# no torch, and a sweep with nothing to run never does.
_LAZY = {
    "batch_norm": "function",
    "batch_norm_relu_pool": "function",
    "batch_norm_stats": "function",
    "batch_norm_synced": "function",
    "batch_norm_tracked": "function",
    "batch_norm_train": "function",
    "BACKENDS": "ops",
    "relu_pool_applies": "ops",
    "resolve_backend": "ops",
}

__all__ = [
    "BACKENDS",
    "batch_norm",
    "batch_norm_relu_pool",
    "batch_norm_stats",
    "batch_norm_synced",
    "batch_norm_train",
    "batch_norm_tracked",
    "relu_pool_applies",
    "resolve_backend",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
