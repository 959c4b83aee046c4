"""Models: every model is built from a config and a norm registry entry.

Models never name a normalization variant: they receive a
:class:`~normbench.norms.registry.NormSpec` and call it with a channel count
(:mod:`normbench.models.registry`). A built model is then put in the memory layout its
run asks for (:mod:`normbench.models.layout`).
"""

from __future__ import annotations

# Registration happens on import; these modules only define and register models.
from normbench.models import mlp, resnet, small_cnn  # noqa: F401
from normbench.models.layout import (
    choose_memory_format,
    set_memory_format,
    torch_memory_format,
)
from normbench.models.registry import build_model, model_names, register_model

__all__ = [
    "build_model",
    "choose_memory_format",
    "model_names",
    "register_model",
    "set_memory_format",
    "torch_memory_format",
]
