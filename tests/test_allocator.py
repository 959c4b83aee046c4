"""Tests for normbench.allocator: page faults counted in fresh processes, with and without it.

malloc's settings are per process, so every case runs in a subprocess of its own;
the subprocess allocates through the C library's ``malloc`` directly (as torch's CPU
allocator does), without importing torch.
"""

import json
import os
import platform
import subprocess
import sys

import pytest

from normbench import allocator

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="tunes glibc's malloc; elsewhere keep_freed_memory() is a no-op",
)

# Three 16 MiB blocks allocated, written and freed, round after round: the freed
# heap (48 MiB) exceeds glibc's dynamic trim threshold (twice the 16 MiB mmap
# threshold it settles on), so by default every round faults its pages in again.
STEPS = r"""
import ctypes, ctypes.util, json, resource, sys
from normbench import allocator

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 16 << 20

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def round_():
    before = faults()
    blocks = [libc.malloc(SIZE) for _ in range(3)]
    for b in blocks:
        ctypes.memset(b, 1, SIZE)
    for b in blocks:
        libc.free(b)
    return faults() - before

tuned = allocator.keep_freed_memory()
again = allocator.keep_freed_memory()
rounds = [round_() for _ in range(4)]
print(json.dumps({"tuned": tuned, "again": again, "is_tuned": allocator.tuned(),
                  "rounds": rounds}))
"""

PAGES = 3 * (16 << 20) // 4096  # pages the three blocks span


def _run(**env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUN"))}
    clean.pop("NORMBENCH_MALLOC", None)
    clean.pop("LD_PRELOAD", None)
    out = subprocess.run(
        [sys.executable, "-c", STEPS],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def test_tuned_malloc_reuses_freed_memory_without_page_faults():
    result = _run()
    assert result["tuned"] and result["again"] and result["is_tuned"]
    # the first round faults the heap in; later rounds reuse it
    assert result["rounds"][0] > PAGES // 2
    assert max(result["rounds"][1:]) < PAGES // 20


def test_glibc_defaults_fault_every_round():
    # the behaviour the tuning exists for, measured the same way
    result = _run(NORMBENCH_MALLOC="system")
    assert not result["tuned"] and not result["is_tuned"]
    assert min(result["rounds"][1:]) > PAGES // 2


@pytest.mark.parametrize(
    "name, value",
    [
        ("NORMBENCH_MALLOC", "system"),
        ("MALLOC_TRIM_THRESHOLD_", "1000000"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000000"),
        ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
    ],
)
def test_a_user_tuned_allocator_is_left_alone(monkeypatch, name, value):
    # refused before anything is set, so this process's malloc stays as it is
    monkeypatch.setitem(allocator._state, "tuned", False)
    monkeypatch.setenv(name, value)
    assert allocator.keep_freed_memory() is False
    assert not allocator.tuned()
