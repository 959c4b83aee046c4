"""The compiled CPU kernel's build cache: naming, locking between processes, recovery.

The real compile takes ~40 s, so these tests replace ``cpu._build`` (the call into
``torch.utils.cpp_extension.load``) with a stand-in and check the orchestration
around it; the real build is exercised by every other kernel test.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from normbench.kernels import cpu


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMBENCH_KERNEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_name_tracks_everything_the_build_depends_on(monkeypatch, tmp_path):
    """The source, the flags, the compiler (name, file, version), torch's version and
    folder, Python (executable, prefix, version) and the CPU's instruction sets: two
    environments that differ in any of them get two builds."""
    name = cpu.extension_name()
    assert name.startswith("normbench_bn_cpu_") and name == cpu.extension_name()
    changes = [
        lambda: monkeypatch.setattr(cpu, "_cpu_signature", lambda: "flags : sse2"),
        lambda: monkeypatch.setattr(cpu, "CFLAGS", [*cpu.CFLAGS, "-DOTHER"]),
        lambda: monkeypatch.setattr(cpu, "LDFLAGS", [*cpu.LDFLAGS, "-lm"]),
        lambda: monkeypatch.setenv("CXX", shutil.which("c++")),  # the same, named otherwise
        lambda: monkeypatch.setattr(sys, "executable", str(tmp_path / "python")),
        lambda: monkeypatch.setattr(sys, "prefix", str(tmp_path)),
        lambda: monkeypatch.setattr(torch, "__version__", "0.0.1"),
        lambda: monkeypatch.setattr(inspect, "getfile", lambda _: str(tmp_path / "torch" / "x")),
    ]
    source = tmp_path / "batchnorm_cpu.cpp"
    source.write_text(cpu.SOURCE.read_text() + "\n// another source\n")
    changes.append(lambda: monkeypatch.setattr(cpu, "SOURCE", source))
    for change in changes:
        change()
        assert cpu.extension_name() != name
        monkeypatch.undo()
        assert cpu.extension_name() == name
    compiler = cpu.build_key()[3:6]
    assert compiler[0] == os.environ.get("CXX", "c++") and "(" in compiler[2]  # its --version


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


# A library of one function, built as the kernel is (the same flags, torch's load and
# load_library), with no header to parse: it compiles in well under a second (torch's
# headers took 8-10 s a build), so that several builds can run in a test.
TINY_SOURCE = """extern "C" int normbench_cache_test_one() { return 1; }
"""

LOAD_DRIVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from normbench.kernels import cpu

    cpu.SOURCE = Path(sys.argv[1])
    print(cpu._load())
    """
)


def test_two_checkouts_and_two_environments_never_rebuild_each_others_kernel(tmp_path):
    """Two checkouts (the same source in two folders) and two environments (here: the same
    compiler named two ways, CXX) share one cache, loading in turn: each environment
    compiles once, saying so on stderr with the time taken, and never again. (The build
    named its checkout's path and the cache name no environment: each switch recompiled.)"""
    checkouts = [tmp_path / "a" / "batchnorm_cpu.cpp", tmp_path / "b" / "batchnorm_cpu.cpp"]
    for source in checkouts:
        source.parent.mkdir()
        source.write_text(TINY_SOURCE)
    cache = tmp_path / "cache"
    environments = [{"CXX": "c++"}, {"CXX": shutil.which("c++")}]

    def load(checkout, environment):
        env = {**os.environ, "NORMBENCH_KERNEL_CACHE": str(cache), **environment}
        done = subprocess.run(
            [sys.executable, "-c", LOAD_DRIVER, str(checkouts[checkout])],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return Path(done.stdout.strip()), done.stderr

    first = [load(0, environments[0]), load(1, environments[1])]
    (library_a, err_a), (library_b, err_b) = first
    assert library_a.parent != library_b.parent  # two environments: two builds
    for library, err in first:
        lines = [line for line in err.splitlines() if line.startswith("normbench:")]
        assert len(lines) == 2, err
        assert lines[0].startswith("normbench: compiling the CPU BatchNorm kernel")
        folder = re.escape(str(library.parent))
        done = rf"normbench: compiled the CPU BatchNorm kernel in \d+ s \({folder}\)"
        assert re.fullmatch(done, lines[1]), lines[1]
    built = {library: library.stat().st_mtime_ns for library in (library_a, library_b)}
    for checkout, environment in [(1, 0), (0, 1), (0, 0), (1, 1), (1, 0)]:
        library, err = load(checkout, environments[environment])
        assert library == (library_a, library_b)[environment]
        assert "normbench:" not in err  # nothing compiled
    assert {library: library.stat().st_mtime_ns for library in built} == built
    for library in built:  # ninja ran each build once: one compile, one link
        assert len((library.parent / ".ninja_log").read_text().splitlines()) == 3
        build = (library.parent / "build.ninja").read_text()
        assert not any(str(source.parent) in build for source in checkouts)  # no checkout named


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
# the norm, ReLU and 2x2 max-pooling in one layer: odd planes, channels that fill no vector
# and several that do
for dtype, tol in dtypes[:2]:
    for shape in ((6, 5, 8, 8), (3, 19, 7, 9), (2, 40, 4, 6)):
        x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(shape[1], dtype=dtype), torch.randn(shape[1], dtype=dtype)
        mean, invstd = nb.batch_norm_stats(x, 1e-5)
        out, choice = nb.relu_pool_forward(x, w, b, mean, invstd)
        dy = torch.randn_like(out)
        got = (out, *nb.relu_pool_backward(dy, x, choice, w, b, mean, invstd))
        xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
        z = torch.nn.functional.batch_norm(xr, None, None, wr, br, True, 0.0, 1e-5)
        yr = torch.nn.functional.max_pool2d(torch.relu(z), 2)
        yr.backward(dy.double())
        for ours, theirs in zip(got, (yr, xr.grad, wr.grad, br.grad)):
            torch.testing.assert_close(ours.double(), theirs.double(), rtol=tol, atol=tol)
# in float16 and bfloat16 (float32 parameters): the composition of the path's own norm-ReLU
# and max_pool2d, the output bit for bit (ties of values that round alike included)
for dtype in (torch.float16, torch.bfloat16):
    for shape in ((3, 19, 7, 9), (2, 40, 4, 6)):
        x = (torch.randn(shape) * 2 + 0.5).to(dtype).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(shape[1]), torch.randn(shape[1])
        y, mean, invstd = nb.batch_norm_forward(x, w, b, 1e-5, True)
        out, choice = nb.relu_pool_forward(x, w, b, mean, invstd)
        want, index = torch.nn.functional.max_pool2d(y, 2, return_indices=True)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        dy = torch.randn_like(out)
        dx, dw, db = nb.relu_pool_backward(dy, x, choice, w, b, mean, invstd, False)
        yr = y.detach().float().requires_grad_()
        torch.nn.functional.max_pool2d(yr, 2).backward(dy.float())
        torch.testing.assert_close(db, (yr.grad * (y > 0)).sum((0, 2, 3)), rtol=1e-5, atol=1e-5)
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
    and without, in both orders of the channels-first layout; and the norm, ReLU and
    max-pooling in one layer against torch's three in float32 and float64."""
    process = isa_checks[isa]
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert out.strip().endswith("ok")


def test_the_debug_build_is_a_build_of_its_own(monkeypatch):
    """NORMBENCH_KERNEL_DEBUG=1 builds without optimization (its -O0 after CFLAGS' -O3, so
    it wins) and with debug information, under a name of its own; 0 is the optimized
    build; anything else is refused."""
    plain = cpu.extension_name()
    monkeypatch.setenv(cpu.DEBUG_ENV, "0")
    assert cpu.extension_name() == plain
    monkeypatch.setenv(cpu.DEBUG_ENV, "1")
    flags = cpu.cflags()
    assert "-g" in flags and flags.index("-O0") > flags.index("-O3")
    assert cpu.extension_name() != plain
    monkeypatch.setenv(cpu.DEBUG_ENV, "yes")
    with pytest.raises(ValueError, match="NORMBENCH_KERNEL_DEBUG='yes': valid are '0' and '1'"):
        cpu.cflags()


def test_an_unknown_isa_is_refused(monkeypatch):
    monkeypatch.setenv(cpu.ISA_ENV, "avx1024")
    valid = "valid are native, avx2, sse"
    with pytest.raises(ValueError, match=f"NORMBENCH_KERNEL_ISA='avx1024': {valid}"):
        cpu.cflags()


LOAD_AGAIN_DRIVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from normbench.kernels import cpu

    cpu.SOURCE = Path(sys.argv[1])
    print(cpu._load())
    print("torch.utils.cpp_extension" in sys.modules)
    """
)


def test_a_library_built_before_loads_without_torchs_build_machinery(tmp_path):
    """Once built and loaded, the library is marked (its size and mtime): the next process
    loads it directly, without importing ``torch.utils.cpp_extension`` (setuptools) or
    running ninja and the compiler's checks; a library changed since is loaded the long
    way, which marks it anew."""
    source = tmp_path / "batchnorm_cpu.cpp"
    source.write_text(TINY_SOURCE)
    env = {**os.environ, "NORMBENCH_KERNEL_CACHE": str(tmp_path / "cache")}

    def load() -> tuple[Path, bool, str]:
        done = subprocess.run(
            [sys.executable, "-c", LOAD_AGAIN_DRIVER, str(source)],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        path, long_way = done.stdout.split()
        return Path(path), long_way == "True", done.stderr

    library, long_way, err = load()
    assert long_way and "compiling" in err
    mark = library.parent / cpu.BUILT_MARK
    info = library.stat()
    assert mark.read_text() == f"{info.st_size} {info.st_mtime_ns}\n"
    assert load()[:2] == (library, False)
    os.utime(library, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))  # relinked, say
    again, long_way, err = load()
    assert again == library and long_way and "compiling" not in err  # ninja: up to date
    assert mark.read_text() == f"{info.st_size} {info.st_mtime_ns + 10**9}\n"


def test_a_marked_library_that_does_not_load_is_built_the_long_way(cache, monkeypatch):
    name = cpu.extension_name()
    folder = cache / name
    folder.mkdir(parents=True)
    library = folder / f"{name}.so"
    library.write_bytes(b"not a library")
    (folder / cpu.BUILT_MARK).write_text(cpu._identity(library))
    calls = []

    def build(name, folder):
        calls.append(name)
        library.write_bytes(b"rebuilt, still not a library")
        return str(library)

    monkeypatch.setattr(cpu, "_build", build)
    assert cpu._load() == str(library) and calls == [name]
    assert (folder / cpu.BUILT_MARK).read_text() == cpu._identity(library)
