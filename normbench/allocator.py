"""glibc malloc tuned for training: keep freed memory instead of faulting it in again every step.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc's defaults suit
programs whose memory use stays level, not a training step, which allocates and
frees the same activations (megabytes each) over and over:

- a block larger than the *mmap threshold* (128 KiB at first, raised dynamically up
  to 32 MiB) is mapped on allocation and unmapped on free;
- when the free memory at the top of the heap exceeds the *trim threshold* (twice
  the mmap threshold), ``free`` gives it back to the kernel.

Either way the next step's tensors land on fresh pages, and the kernel zeroes each
4 KiB page on its first touch: a page fault per 4 KiB written. On the 2-core VM
this was measured on, an activation's faults cost more time per BatchNorm step than
the BatchNorm itself, for ``torch.nn.BatchNorm2d`` and normbench's alike
(benchmarks/README.md; ``benchmarks/`` and ``normbench bench`` count them).

:func:`keep_freed_memory` sets both thresholds once, as the PyTorch performance
guides' advice to preload jemalloc or tcmalloc does for the same reason: blocks up
to 32 MiB (glibc's maximum) come from the heap, and up to :data:`TRIM_THRESHOLD`
of free heap is kept for the next step. A process's resident memory then stays
at its peak, which a training step reaches every step anyway (a sweep running in
one process stays at its largest run's peak, which the next run reuses).

Nothing is changed where the allocator is not glibc's (macOS, musl, a preloaded
jemalloc or tcmalloc), where the user tunes glibc already (``GLIBC_TUNABLES`` or
``MALLOC_*_`` variables), or where ``NORMBENCH_MALLOC=system`` asks for glibc's
defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory", "tuned"]

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 1024 * 1024 * 1024  # free heap kept for reuse at most

_state: dict[str, bool] = {"tuned": False}


def _user_tunes_malloc() -> bool:
    env = os.environ
    if env.get("NORMBENCH_MALLOC", "").lower() == "system":
        return True
    if "GLIBC_TUNABLES" in env or any(k.startswith("MALLOC_") and k.endswith("_") for k in env):
        return True
    preload = env.get("LD_PRELOAD", "")
    return any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc"))


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for repeated steps (see the module docstring); True if tuned.

    Idempotent; a no-op (False) where the allocator is not glibc's or the user
    tunes it already.
    """
    if _state["tuned"]:
        return True
    if _user_tunes_malloc():
        return False
    libc = _glibc()
    if libc is None:
        return False
    # The mmap threshold first: setting either one turns off glibc's dynamic
    # adjustment of both, and a fixed 128 KiB mmap threshold would be worse than
    # the defaults.
    if not libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        return False
    libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    _state["tuned"] = True
    return True


def tuned() -> bool:
    """Whether :func:`keep_freed_memory` tuned this process."""
    return _state["tuned"]
