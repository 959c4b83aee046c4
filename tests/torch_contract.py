"""The errors normbench's BatchNorm raises where torch's checks changed between versions.

normbench keeps the argument checks of torch 2.13's ``F.batch_norm`` (and of 2.14's, the
same) whatever torch is installed. Older torch checked less, or otherwise: 2.4 had no eps
check and took one running statistic without the other; 2.11 refused eps <= 0 in eval
too, worded "batch_norm eps must be positive, but got ...". The tests compare normbench's
errors with the installed torch's where it keeps those checks, and with 2.13's errors,
written here, where it does not.

Use from another test file: ``from torch_contract import expected_error``.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from packaging.version import Version

#: Whether the installed torch's BatchNorm takes ``bias`` (keyword-only: a weight without
#: a bias), which normbench's drop-ins then take too.
TORCH_TAKES_BIAS = "bias" in inspect.signature(torch.nn.BatchNorm2d.__init__).parameters

#: Whether the installed torch checks F.batch_norm's arguments as normbench does.
CHECKS_AS_NORMBENCH = Version(torch.__version__.split("+")[0]) >= Version("2.13")


def eps_error(eps: float, training: bool) -> tuple[type[Exception], str]:
    """torch 2.13's error for a non-positive eps in training, a negative one in eval."""
    if training:
        return ValueError, f"batch_norm eps must be positive during training, but got {eps}"
    return ValueError, f"batch_norm eps must be non-negative, but got {eps}"


ONE_RUNNING_STATISTIC = (
    ValueError,
    "running_mean and running_var must either both be None or neither be None",
)


def torch_error(fn) -> tuple[type[BaseException], str]:
    """The exception type and message of ``fn()``, which must raise."""
    with pytest.raises(Exception) as info:
        fn()
    return info.type, str(info.value)


def expected_error(fn, error: tuple[type[Exception], str]) -> tuple[type[BaseException], str]:
    """``fn``'s error where torch checks as normbench does (``fn`` calls torch), else
    ``error``, torch 2.13's."""
    return torch_error(fn) if CHECKS_AS_NORMBENCH else error
