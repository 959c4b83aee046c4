"""The compiled CPU kernel's build cache: naming, locking between processes, recovery.

The real compile takes ~40 s, so these tests replace ``cpu._build`` (the call into
``torch.utils.cpp_extension.load``) with a stand-in and check the orchestration
around it; the real build is exercised by every other kernel test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types

import pytest

from normbench.kernels import cpu


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMBENCH_KERNEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_name_tracks_source_flags_and_cpu(monkeypatch):
    name = cpu.extension_name()
    assert name.startswith("normbench_bn_cpu_") and name == cpu.extension_name()
    monkeypatch.setattr(cpu, "_cpu_signature", lambda: "flags : sse2")
    assert cpu.extension_name() != name
    monkeypatch.undo()
    monkeypatch.setattr(cpu, "CFLAGS", [*cpu.CFLAGS, "-DOTHER"])
    assert cpu.extension_name() != name


def test_the_cache_folder_follows_the_environment(cache):
    assert cpu.cache_root() == cache


def test_a_stale_lock_of_torch_is_removed_before_building(cache, monkeypatch):
    name = cpu.extension_name()
    (cache / name).mkdir(parents=True)
    (cache / name / "lock").write_text("")  # left by a build killed inside torch's FileBaton

    def build(name, folder):
        assert not (folder / "lock").exists()
        return types.SimpleNamespace(name=name)

    monkeypatch.setattr(cpu, "_build", build)
    assert cpu._load().name == name


def test_a_library_that_does_not_load_is_rebuilt_once(cache, monkeypatch):
    calls = []

    def build(name, folder):
        calls.append(sorted(p.name for p in folder.iterdir()))
        if len(calls) == 1:
            (folder / f"{name}.so").write_bytes(b"truncated")
            raise ImportError("invalid ELF header")
        return types.SimpleNamespace(name=name)

    monkeypatch.setattr(cpu, "_build", build)
    cpu._load()
    assert len(calls) == 2 and calls[1] == []  # the broken build was wiped first


DRIVER = textwrap.dedent(
    """
    import json, sys, time, types
    from pathlib import Path
    from normbench.kernels import cpu

    def build(name, folder):
        start = time.time()
        time.sleep(1.0)
        (Path(folder) / f"{name}.so").write_bytes(b"built")
        return types.SimpleNamespace(interval=(start, time.time()))

    cpu._build = build
    print(json.dumps(cpu._load().interval))
    """
)


def test_concurrent_processes_build_one_at_a_time(cache):
    env_python = [sys.executable, "-c", DRIVER]
    procs = [
        subprocess.Popen(env_python, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    (a0, a1), (b0, b1) = sorted(json.loads(out) for out, _ in outs)
    assert a1 <= b0, "the two builds overlapped"
    # Only the first found no library and said it was compiling.
    assert sum("compiling" in err for _, err in outs) == 1


def test_a_failed_compile_reports_the_compilers_error_lines(monkeypatch):
    log = (
        "Error building extension 'x': [1/2] c++ -MMD " + "-Iinclude " * 80 + "\n"
        "/src/batchnorm_cpu.cpp:12:3: error: 'foo' was not declared in this scope\n"
        "ninja: build stopped: subcommand failed.\n"
    )

    def broken():
        raise RuntimeError(log)

    monkeypatch.setattr(cpu, "_extension", None)
    monkeypatch.setattr(cpu, "_failure", None)
    monkeypatch.setattr(cpu, "_load", broken)
    with pytest.warns(RuntimeWarning, match="'foo' was not declared"):
        assert cpu.extension() is None
    assert "batchnorm_cpu.cpp:12:3: error" in cpu.failure()


ISA_CHECK = """
import itertools, os, sys, torch
from normbench.kernels import cpu, reference
nb = cpu.extension()
assert nb is not None, cpu.failure()
assert sys.argv[1] in cpu.cflags()
torch.manual_seed(0)
dtypes = ((torch.float32, 1e-4), (torch.float64, 1e-10), (torch.float16, 2e-2),
          (torch.bfloat16, 1e-1))
shapes = (((8, 5, 7, 7), None), ((6, 5, 8, 8), torch.channels_last), ((40, 19), None),
          ((6, 5, 4, 4), None))
streams = ("0", str(1 << 62))  # streaming stores for every output that can take them; none
orders = ("channels", "samples")
for (dtype, tol), (shape, fmt), stream, order in itertools.product(dtypes, shapes, streams, orders):
    os.environ["NORMBENCH_KERNEL_STREAM_BYTES"] = stream
    os.environ["NORMBENCH_KERNEL_PLANE_ORDER"] = order
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 3).to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    w, b = torch.randn(shape[1], dtype=dtype), torch.randn(shape[1], dtype=dtype)
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    for relu in (False, True):
        y, mean, invstd = nb.batch_norm_forward(x, w, b, 1e-5, relu)
        ry, rmean, rinvstd = reference.forward_train(x, w, b, 1e-5)
        ry = torch.relu(ry) if relu else ry
        torch.testing.assert_close(y.double(), ry.double(), rtol=tol, atol=tol)
        torch.testing.assert_close(mean, rmean, rtol=tol, atol=tol)
        grads = nb.batch_norm_backward(dy, x, w, b, mean, invstd, relu)
        mask = (y > 0) if relu else torch.ones_like(y, dtype=torch.bool)
        expected = reference.backward(dy * mask, x, w, rmean, rinvstd)
        for ours, theirs in zip(grads, expected):
            torch.testing.assert_close(ours.double(), theirs.double(), rtol=tol, atol=tol)
print("ok")
"""


ISA_PATHS = {"avx2": "-mno-avx512f", "sse": "-mno-avx"}


@pytest.fixture(scope="module")
def isa_checks():
    """Every code path's check (ISA_CHECK in a process of its own), all started at once:
    each compiles its own build on one core (~40 s where the cache is cold, as in CI), so
    together they take about the time of one."""
    started = {
        isa: subprocess.Popen(
            [sys.executable, "-c", ISA_CHECK, flag],
            env={**os.environ, cpu.ISA_ENV: isa, "NORMBENCH_KERNEL_CACHE": str(cpu.cache_root())},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for isa, flag in ISA_PATHS.items()
    }
    yield started
    for process in started.values():
        process.kill()
        process.communicate()


@pytest.mark.parametrize("isa", list(ISA_PATHS))
def test_each_code_path_matches_the_reference(isa_checks, isa):
    """NORMBENCH_KERNEL_ISA=avx2 builds the path AVX2-only CPUs take (on an AVX-512 CPU
    too), ``sse`` the path of CPUs without AVX: their kernels pass the reference in every
    dtype, layout and with the fused ReLU, with streaming stores (where the path has them)
    and without, in both orders of the channels-first layout."""
    process = isa_checks[isa]
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert out.strip().endswith("ok")


def test_an_unknown_isa_is_refused(monkeypatch):
    monkeypatch.setenv(cpu.ISA_ENV, "avx1024")
    valid = "valid are native, avx2, sse"
    with pytest.raises(ValueError, match=f"NORMBENCH_KERNEL_ISA='avx1024': {valid}"):
        cpu.cflags()
