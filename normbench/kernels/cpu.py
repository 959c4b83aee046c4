"""The operators' library: ``batchnorm_cpu.cpp`` compiled at first use and cached per machine.

Loading it registers the ``normbench::`` operators with torch's dispatcher (their schemas,
CPU kernels and autograd, in C++); :func:`extension` is ``torch.ops.normbench`` once
loaded. This module builds and loads the library and imports nothing else of the package:
:func:`normbench.kernels.ops.library` calls :func:`extension` and then adds the operators'
fake and CUDA (Triton) implementations.

The extension is built with ``torch.utils.cpp_extension.load`` (g++ and OpenMP,
``-O3 -march=native``) into ``~/.cache/normbench/kernels/<name>/`` (or
``$NORMBENCH_KERNEL_CACHE``), where ``name`` hashes everything the build depends on
(:func:`build_key`): the source, the compile and link flags, the compiler (its path and
``--version``), torch (its version and install folder, whose headers and libraries the
build uses), Python (executable, prefix, version) and the CPU's instruction sets. So an
environment compiles it once and keeps its build: two checkouts, a checkout and a wheel,
or two venvs sharing the cache each get a build of their own instead of rebuilding each
other's, and a shared home on a cluster never hands one CPU's build to another. The
source is copied into the build folder, so the build (``build.ninja``) never names a
checkout's path. Every compile says so on stderr, when it starts and how long it took.

A build that loaded is marked (``built``: the library's size and mtime), and later
processes load that very file with ``torch.ops.load_library``, without importing
``cpp_extension`` or running its checks. Concurrent processes take an exclusive
``flock`` on the cache entry, so one compiles while the others wait; the lock dies with
its process, so a build killed half-way blocks nobody, and a build that does not load is
wiped and redone once.
Without a working compiler the reference implementation is used, with one warning.

``NORMBENCH_KERNEL_SANITIZE=address`` builds it with AddressSanitizer (a build of its
own), for the tests: the process must have ASan's runtime preloaded
(``LD_PRELOAD=$(g++ -print-file-name=libasan.so)``), as Python itself is not built with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("batchnorm_cpu.cpp")
# -mprefer-vector-width=512: on AVX-512 CPUs, g++ otherwise keeps to 256-bit vectors;
# full-width ones made the kernels faster on a Xeon with AVX-512, and change nothing
# elsewhere (benchmarks/README.md).
CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-ffp-contract=fast"]
LDFLAGS = ["-fopenmp"]

#: ``NORMBENCH_KERNEL_ISA=avx2`` builds the AVX2 code path on a CPU that has AVX-512 too
#: (a build of its own, cached beside the native one): to test and time the path that
#: AVX2-only machines take, on any machine. ``sse`` builds the path of a CPU without AVX
#: (an old one, or a virtual machine whose CPU model hides AVX): 16-byte vectors (SSE2's
#: streaming stores too), float16 converted a value at a time.
ISA_ENV = "NORMBENCH_KERNEL_ISA"
ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512f"], "sse": ["-mno-avx"]}


#: Outputs at least this many bytes large are written with streaming stores (the default
#: is a quarter of the last-level cache; see "streaming stores" in batchnorm_cpu.cpp, which
#: reads it on every call). 0 streams every output that can be.
STREAM_ENV = "NORMBENCH_KERNEL_STREAM_BYTES"

#: At most this many bytes of freed outputs are kept for the next outputs of the same size
#: (the default is 1/16 of physical memory, at most 1 GiB; see "the output pool" in
#: batchnorm_cpu.cpp, which reads it on every allocation). 0 keeps none.
POOL_ENV = "NORMBENCH_KERNEL_POOL_BYTES"

#: The order the channels-first ("planes") kernels read a tensor in: ``channels`` (tasks
#: own blocks of channels, each read twice from the core's cache), ``samples`` (tasks own
#: runs of samples, each pass reading memory in order) or ``auto`` (the default:
#: ``samples`` for inputs larger than the core's L2 that fit half the last-level
#: cache, or whose channel blocks would not fit the L2; see "the planes layout's order" in
#: batchnorm_cpu.cpp, which reads it on every call).
ORDER_ENV = "NORMBENCH_KERNEL_PLANE_ORDER"
ORDERS = ("auto", "channels", "samples")


#: ``NORMBENCH_KERNEL_SANITIZE=address``: the build with AddressSanitizer (cached beside the
#: others), which reports any read or write outside a tensor; the tests run the fuzz cases
#: on it (tests/test_kernel_fuzz.py).
SANITIZE_ENV = "NORMBENCH_KERNEL_SANITIZE"
SANITIZERS = {
    "": ([], []),
    # -g1: line tables alone, enough for ASan's reports to name the source lines; -O0 (after
    # CFLAGS' -O3, so it wins): every load and store is checked as written, and the build
    # takes a third of -O1 -g's time (benchmarks/README.md)
    "address": (
        ["-fsanitize=address", "-fno-omit-frame-pointer", "-g1", "-O0"],
        ["-fsanitize=address"],
    ),
}


#: ``NORMBENCH_KERNEL_DEBUG=1``: the build without optimization and with debug information
#: (``-O0 -g``, cached beside the others), to step through the kernel in gdb. It compiles in
#: about a third of the optimized build's time, so the tests that check how a build is
#: found, compiled and loaded (not how fast it runs) use it. ``0`` or unset: optimized.
DEBUG_ENV = "NORMBENCH_KERNEL_DEBUG"
DEBUG_FLAGS = ["-g", "-O0"]  # after CFLAGS' -O3, so it wins


def _debug() -> bool:
    value = os.environ.get(DEBUG_ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{DEBUG_ENV}={value!r}: valid are '0' and '1' (unset: 0)")
    return value == "1"


def check_environment() -> None:
    """The kernel's environment variables (``ISA_ENV``, ``SANITIZE_ENV``, ``DEBUG_ENV``,
    ``STREAM_ENV``, ``POOL_ENV``, ``ORDER_ENV``), checked before any work: a UserError
    naming the one that is wrong (the kernel itself would refuse it only when it runs,
    with a RuntimeError)."""
    from normbench.errors import UserError

    try:
        cflags()
    except ValueError as err:
        raise UserError(str(err)) from None
    for name in (STREAM_ENV, POOL_ENV):
        value = os.environ.get(name)
        if value is not None and not re.fullmatch(r"[0-9]+", value):
            raise UserError(f"{name}={value!r}: expected a whole number of bytes, 0 or more")
    order = os.environ.get(ORDER_ENV, "auto")
    if order not in ORDERS:
        raise UserError(f"{ORDER_ENV}={order!r}: valid are {', '.join(ORDERS)}")


def _sanitizer() -> str:
    name = os.environ.get(SANITIZE_ENV, "")
    if name not in SANITIZERS:
        valid = ", ".join(repr(s) for s in SANITIZERS)
        raise ValueError(f"{SANITIZE_ENV}={name!r}: valid are {valid} (unset: none)")
    return name


def cflags() -> list[str]:
    """The compiler flags of this process's build: CFLAGS, for the ISA asked for (and the
    sanitizer, where one is; the debug build's flags, where asked for)."""
    isa = os.environ.get(ISA_ENV, "native")
    if isa not in ISA_FLAGS:
        raise ValueError(f"{ISA_ENV}={isa!r}: valid are {', '.join(ISA_FLAGS)}")
    extra = SANITIZERS[_sanitizer()][0] + (DEBUG_FLAGS if _debug() else [])
    if isa == "native":
        return list(CFLAGS) + extra
    flags = [f for f in CFLAGS if not f.startswith("-mprefer-vector-width")]
    return flags + ISA_FLAGS[isa] + extra


def ldflags() -> list[str]:
    """The link flags of this process's build."""
    return LDFLAGS + SANITIZERS[_sanitizer()][1]


_extension: Any | None = None
_failure: str | None = None


def cache_root() -> Path:
    root = os.environ.get("NORMBENCH_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "normbench" / "kernels"


def _cpu_signature() -> str:
    """The instruction-set flags of this CPU: -march=native code runs only where they match."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _compiler() -> list[str]:
    """The C++ compiler torch's build runs (``$CXX``, else ``c++``): as named, the file it
    resolves to, and its ``--version``."""
    name = os.environ.get("CXX", "c++")
    path = shutil.which(name) or name
    try:
        version = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:  # no compiler: the build says so
        version = f"unavailable: {type(err).__name__}"
    return [name, os.path.realpath(path), version]


def build_key() -> list[str]:
    """Everything the build depends on, each part a line of the key that names it (see
    the module's docstring): what differs between two environments gives two builds."""
    import torch

    return [
        SOURCE.read_text(),
        " ".join(cflags()),
        " ".join(ldflags()),
        *_compiler(),
        torch.__version__,
        str(Path(inspect.getfile(torch)).resolve().parent),  # its headers and libraries
        sys.executable,
        sys.prefix,
        sys.version,
        _cpu_signature(),
    ]


def extension_name() -> str:
    key = "\n".join(build_key())
    return "normbench_bn_cpu_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _ninja_on_path() -> None:
    # torch finds ninja on PATH; the pip package's binary may not be there outside the venv.
    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass


def _source_in(folder: Path) -> Path:
    """The source, copied into the build folder once (the folder's name hashes its text):
    the build then names no checkout's path, and its copy keeps its first mtime, so ninja
    finds nothing newer than the library it built."""
    copy = folder / SOURCE.name
    text = SOURCE.read_text()
    if not copy.exists() or copy.read_text() != text:
        _write_replacing(copy, text)
    return copy


def _write_replacing(path: Path, text: str) -> None:
    """``text`` into ``path`` through a partial file renamed over it, so that another
    process reads the old text or the new, never part of it; the partial file is removed
    when the write fails."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(text)
        partial.replace(path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise


def _build(name: str, folder: Path) -> str:
    # Importing cpp_extension logs a warning about CUDA_HOME on machines without CUDA:
    # irrelevant to a CPU build, and alarming in the middle of a training run.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.cpp_extension import load

    # Not a Python module: a library whose TORCH_LIBRARY blocks register the operators
    # when torch loads it (torch.ops.load_library).
    load(
        name=name,
        sources=[str(_source_in(folder))],
        extra_cflags=cflags(),
        extra_ldflags=ldflags(),
        build_directory=str(folder),
        verbose=False,
        is_python_module=False,
    )
    return str(folder / f"{name}.so")


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _build_reported(name: str, folder: Path) -> str:
    """:func:`_build`, and a line on stderr when it compiles and when it is done, with the
    time taken (a compile is a library that is new or newer afterwards)."""
    from normbench.terminal import clean  # the cache folder may come from the environment

    library = folder / f"{name}.so"
    before = _mtime(library)
    source = _mtime(folder / SOURCE.name)
    expected = before is None or (source is not None and source > before)
    where = clean(folder)
    if expected:
        sys.stderr.write(
            f"normbench: compiling the CPU BatchNorm kernel (once per environment, "
            f"about a minute) into {where}\n"
        )
        sys.stderr.flush()
    start = time.monotonic()
    built = _build(name, folder)
    after = _mtime(library)
    if after is not None and after != before:
        seconds = time.monotonic() - start
        sys.stderr.write(
            f"normbench: compiled the CPU BatchNorm kernel in {seconds:.0f} s ({where})\n"
        )
    return built


def _load() -> str:
    name = extension_name()
    folder = cache_root() / name
    folder.mkdir(parents=True, exist_ok=True)
    _ninja_on_path()
    _check_sanitizer_runtime()
    with open(cache_root() / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when this process exits, however it exits
        library = folder / f"{name}.so"
        if _loaded_as_built(folder, library):
            return str(library)
        # Holding the lock, nobody else is building: a lock file of torch's own is stale.
        (folder / "lock").unlink(missing_ok=True)
        try:
            built = _build_reported(name, folder)
        except (ImportError, OSError):
            # A build cut short (kill -9 during the link) leaves a library that will not load.
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            built = _build_reported(name, folder)
        _mark_built(folder, library)
        return built


#: The file beside a library that torch's build loaded: the library's size and mtime then.
BUILT_MARK = "built"


def _identity(library: Path) -> str | None:
    try:
        info = library.stat()
    except OSError:
        return None
    return f"{info.st_size} {info.st_mtime_ns}\n"


def _mark_built(folder: Path, library: Path) -> None:
    """Records that ``library`` was built and loaded: later processes load it directly
    (:func:`_loaded_as_built`) rather than through ``cpp_extension.load``, whose import
    (setuptools) and checks (ninja's, the compiler's version) cost each process time
    (benchmarks/README.md, "Loading a built kernel") for a library the folder's name
    already ties to its source and flags."""
    identity = _identity(library)
    if identity is None:
        return
    with contextlib.suppress(OSError):  # (a read-only cache: every load takes the long way)
        _write_replacing(folder / BUILT_MARK, identity)


def _loaded_as_built(folder: Path, library: Path) -> bool:
    """Loads ``library`` with ``torch.ops.load_library`` where it is the very file the
    last build marked (the same size and mtime: one relinked or cut short is not), and
    says whether it did; else the caller builds (ninja finds it up to date) and loads it
    the long way, which marks it anew."""
    try:
        mark = (folder / BUILT_MARK).read_text()
    except (OSError, UnicodeDecodeError):
        return False
    if mark != _identity(library):
        return False
    import torch

    try:
        torch.ops.load_library(str(library))
    except OSError:  # (ctypes: not a library) the long way rebuilds it
        (folder / BUILT_MARK).unlink(missing_ok=True)
        return False
    return True


def _check_sanitizer_runtime() -> None:
    """A sanitized library loads only into a process that has the sanitizer's runtime
    first: refuse at once, rather than build a library that cannot load (twice)."""
    if _sanitizer() != "address":
        return
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return  # not Linux: the load will say
    if "libasan" not in maps:
        raise RuntimeError(
            f"{SANITIZE_ENV}=address needs AddressSanitizer's runtime loaded first: run "
            "Python with LD_PRELOAD=$(g++ -print-file-name=libasan.so) "
            "ASAN_OPTIONS=detect_leaks=0"
        )


def extension() -> Any | None:
    """``torch.ops.normbench``, its library built and loaded on first use, with the C++
    implementations (the operators' CPU kernels and autograd); None where it cannot be
    built. :func:`normbench.kernels.ops.library` adds the Python ones (fakes, Triton)."""
    global _extension
    if _extension is None and _failure is None:
        try:
            _load()
            import torch

            _extension = torch.ops.normbench
        except Exception as err:  # no compiler, no OpenMP, a read-only home: all mean "fall back"
            fall_back(err, stacklevel=2)  # the warning names extension's caller
    return _extension


def fall_back(err: Exception, stacklevel: int = 1) -> None:
    """The library given up for this process, with one warning: ``err`` (from its build or
    load, or from registering its Python implementations) is what :func:`failure` says,
    and :func:`extension` is None from now on. ``stacklevel``: as ``warnings.warn``'s,
    counted from the caller of this function (1: the caller itself)."""
    global _extension, _failure
    _extension = None
    _failure = _reason(err)
    warnings.warn(
        "normbench could not compile its CPU BatchNorm kernel; using the reference "
        f"implementation instead, which is slower ({_failure})",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )


def _reason(err: Exception) -> str:
    """The build's own error lines where there are some (a failed compile starts its
    message with the whole command line), else the message."""
    text = str(err)
    errors = [line.strip() for line in text.splitlines() if "error:" in line]
    detail = " | ".join(errors[-3:]) if errors else " ".join(text.split())
    return f"{type(err).__name__}: {detail[:600]}"


def failure() -> str | None:
    """Why the kernel could not be built, after a failed :func:`extension`; else None."""
    return _failure
