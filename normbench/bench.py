"""``normbench bench``: normbench's BatchNorm kernels timed against ``torch.nn.BatchNorm2d``.

One timed unit is a training step of one BatchNorm layer (the forward in training mode,
then ``y.backward(dy)``), for each implementation of ``IMPLS`` and, per shape, a
``copy`` of the same size: the bandwidth the machine delivers for data of that size.
The machine's copy bandwidth is measured as STREAM does, under the same load as the
shapes. The machine is noisy, so the measurements are interleaved (each repeat runs
every implementation in a shuffled order; the shapes take turns in blocks of ``BLOCK``
repeats), every unit starts with its data out of the core's own caches (a read of
``FLUSH_BYTES`` before it, untimed), and figures are medians and quartiles, never means.
The method and every column are described in docs/kernel.md ("Benchmarking the kernel").

:func:`run_bench` validates its settings (a :class:`~normbench.errors.UserError`
before anything runs), measures and returns one row per (shape, implementation),
columns ``COLUMNS``; it prints nothing itself, it reports to a :class:`Progress`.
:func:`normbench.views.tables.bench_table` renders such a frame for the terminal.
torch and pandas are imported inside the functions, so importing this module is free.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import random
import resource
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from normbench.config import LAYOUTS
from normbench.errors import UserError
from normbench.schema import rules
from normbench.validation import resolve_device

if TYPE_CHECKING:
    import pandas as pd
    from rich.text import Text

Shape = tuple[int, int, int, int]

#: The implementations, in table order; ``copy`` rows follow them.
IMPLS: tuple[str, ...] = ("torch", "reference", "cpu", "triton")
COPY = "copy"

#: CIFAR-sized activations of the small models (N=128 and 256), and a batch of 2.
DEFAULT_SHAPES: tuple[Shape, ...] = (
    (128, 16, 32, 32),
    (128, 32, 16, 16),
    (128, 64, 8, 8),
    (256, 32, 16, 16),
    (2, 16, 32, 32),
)
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16", "float64")
DEFAULT_REPEATS = 400
DEFAULT_WARMUP = 10
DEFAULT_OUT = Path("results") / "bench" / "bench.csv"
#: Timed repeats of one shape in a row, before the next shape's (module docstring).
BLOCK = 20
#: Read before every unit to evict the caches: several times a CPU core's L2, a GPU's L2.
FLUSH_BYTES = {"cpu": 16 << 20, "cuda": 256 << 20}
#: The machine copy's arrays: 4x the largest cache (STREAM's rule), within these bounds.
MACHINE_COPY_BOUNDS = (64 << 20, 1 << 30)
#: Timed machine copies before the shapes' first block, and after each of their blocks:
#: spread over the run as the shapes are, so the shapes' fractions of the machine copy
#: (``frac_of_machine_bw``) compare figures taken under the same load.
MACHINE_REPEATS_FIRST = 4
MACHINE_REPEATS_PER_BLOCK = 2
#: The ``shape`` of the machine copy's samples in :func:`measure`'s frame.
MACHINE = "machine"
#: Linux's description of the CPU's caches: ``index*/size`` holds "32K", "2048K", ...
CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")

#: One row per (shape, implementation); ``impl == "copy"`` rows hold the copy bandwidth.
COLUMNS: tuple[str, ...] = (
    "shape",  # "NxCxHxW"
    "n",
    "c",
    "h",
    "w",
    "numel",
    "dtype",
    "memory_format",  # the layout of the input and its gradient: contiguous | channels_last
    "impl",  # torch | reference | cpu | triton | copy
    "median_ms",
    "q1_ms",  # first quartile
    "q3_ms",  # third quartile
    "min_ms",
    "repeats",  # timed units per implementation and shape
    "warmup",
    "bytes",  # minimum traffic of one unit: 5 x numel x itemsize; 2 x numel x 4 for copy
    "gbps",  # bytes / median, 1e9 bytes per second
    "speedup_vs_torch",  # torch median / median
    "frac_of_copy_bw",  # gbps / copy gbps at the shape
    "machine_copy_bytes",  # bytes per array of the machine copy (4x the largest cache)
    "machine_copy_gbps",  # the machine's copy bandwidth, 1e9 bytes per second
    "frac_of_machine_bw",  # gbps / machine_copy_gbps
    "page_faults",  # minor page faults per unit, mean
    "malloc",  # "kept": glibc tuned by normbench.allocator; "system": its defaults
    "stream_bytes",  # outputs this large on are streamed by the CPU kernel (empty: no kernel)
    "plane_order",  # cpu rows: the order the kernel reads the shape in, "forward/backward"
    "device",  # cpu | cuda
    "device_name",
    "threads",  # torch.get_num_threads() while timing
    "torch_version",
    "normbench_version",
)


# ---------------------------------------------------------------------------- progress


class Progress(Protocol):
    """What :func:`run_bench` reports while it runs."""

    def status(self, message: str) -> None:
        """A phase begins: loading a kernel, warming up a shape."""

    def start(self, total: int) -> None:
        """``total`` rounds (warm-up, then timed) are ahead."""

    def advance(self) -> None:
        """One round done: every implementation ran once at every shape."""

    def note(self, message: str | Text) -> None:
        """Something the user should know: an implementation left out, and why (a rich
        Text where normbench styles its own words; the rest cleaned)."""


class _Silent:
    def status(self, message: str) -> None:
        pass

    def start(self, total: int) -> None:
        pass

    def advance(self) -> None:
        pass

    def note(self, message: str | Text) -> None:
        pass


# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """A validated benchmark: what :func:`measure` runs."""

    shapes: tuple[Shape, ...]
    impls: tuple[str, ...]
    device: str  # cpu | cuda
    dtype: str
    repeats: int
    warmup: int
    threads: int | None  # None: leave torch's setting
    machine_bytes: int  # bytes per array of the machine copy
    memory_format: str = "contiguous"  # the inputs' layout: contiguous | channels_last
    named: bool = False  # the impls were named by the user, not the defaults
    skipped: tuple[tuple[str, str], ...] = ()  # (impl, why) left out of the defaults


def shape_label(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def parse_shape(text: str) -> Shape:
    """``"N,C,H,W"`` (or ``NxCxHxW``) as four positive integers."""
    parts = text.replace("x", ",").split(",")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise UserError(f"bad shape {text!r}: expected N,C,H,W, four positive integers")
    return dims  # type: ignore[return-value]


def _check_shape(shape: Sequence[int]) -> Shape:
    if len(shape) != 4 or any(not isinstance(d, int) or d < 1 for d in shape):
        raise UserError(f"bad shape {tuple(shape)}: expected N,C,H,W, four positive integers")
    n, _c, h, w = shape
    if n * h * w < 2:
        # training-mode BatchNorm needs two values per channel for a variance
        raise UserError(f"bad shape {shape_label(shape)}: N*H*W must be at least 2 to train")
    return tuple(shape)  # type: ignore[return-value]


#: ``--threads`` takes what a run's ``threads`` takes (the schema's rule).
_THREADS = rules()["threads"]


def _resolve_device(device: str) -> str:
    return resolve_device(device, spelled="--device ")


def _unavailable(impl: str, device: str) -> str | None:
    """Why ``impl`` cannot run on ``device``, or None when it can."""
    if impl == "cpu" and device != "cpu":
        return "the C++ kernel runs CPU tensors only (--device cpu)"
    if impl == "triton":
        if device != "cuda":
            return "the Triton kernels run CUDA tensors only (--device cuda)"
        if os.environ.get("TRITON_INTERPRET") == "1":
            return "TRITON_INTERPRET=1 is set: the interpreter measures Python, not the kernels"
        from normbench.kernels import triton_kernels

        if not triton_kernels.available():
            return "the triton package is not installed"
    return None


def cpu_cache_bytes(level: int | None = None) -> int | None:
    """The size of cpu0's level-``level`` data (or unified) cache as Linux lists it in
    sysfs, or with None of its largest cache, the last level (as the CPU kernel's
    ``cache_bytes`` reads them); None where none is listed."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = []
    for index in CPU_CACHES.glob("index*"):
        try:
            text = (index / "size").read_text().strip()
            if level is not None:
                listed = (index / "level").read_text().strip()
                if listed != str(level) or (index / "type").read_text().strip() == "Instruction":
                    continue
        except OSError:
            continue
        if text[:-1].isdigit() and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes) if sizes else None


def largest_cache_bytes(device: str) -> int | None:
    """The largest cache of ``device``: the CPU's last level (Linux sysfs), a GPU's L2."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return cpu_cache_bytes()


def machine_copy_bytes(device: str) -> int:
    """Bytes per array of the machine copy: 4x the largest cache, within
    ``MACHINE_COPY_BOUNDS`` (the upper bound where the cache is not known)."""
    low, high = MACHINE_COPY_BOUNDS
    cache = largest_cache_bytes(device)
    return high if cache is None else min(high, max(low, 4 * cache))


def settings(
    shapes: Iterable[Sequence[int]] | None = None,
    impls: Iterable[str] | None = None,
    *,
    device: str = "auto",
    dtype: str = "float32",
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    threads: int | None = None,
    machine_bytes: int | None = None,
    memory_format: str = "contiguous",
) -> Settings:
    """Check and resolve the benchmark's settings; a :class:`UserError` names what is wrong.

    ``impls=None`` takes every implementation that runs on the device and leaves
    the others out (``Settings.skipped`` says why); a named one that cannot run is
    an error. ``machine_bytes``: the machine copy's array size (None:
    :func:`machine_copy_bytes`).
    """
    shapes = tuple(dict.fromkeys(_check_shape(tuple(s)) for s in (shapes or DEFAULT_SHAPES)))
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise UserError(f"--warmup must be at least 0, got {warmup}")
    if threads is not None and _THREADS.check(threads) is not None:
        raise UserError(f"--threads must be at least 1, got {threads}")
    if machine_bytes is not None and machine_bytes < 4:
        raise UserError(f"machine_bytes must be at least 4, got {machine_bytes}")
    if memory_format not in LAYOUTS:
        valid = ", ".join(LAYOUTS)
        raise UserError(f"unknown memory format {memory_format!r}; valid: {valid}")
    resolved = _resolve_device(device)
    named = list(impls or ())
    skipped = []
    if named:
        chosen = tuple(dict.fromkeys(named))
        for impl in chosen:
            if impl not in IMPLS:
                raise UserError(f"unknown impl {impl!r}; valid: {', '.join(IMPLS)}")
            why = _unavailable(impl, resolved)
            if why:
                raise UserError(f"impl {impl!r} cannot run here: {why}")
        chosen = tuple(impl for impl in IMPLS if impl in chosen)
    else:
        chosen = []
        for impl in IMPLS:
            why = _unavailable(impl, resolved)
            if why:
                skipped.append((impl, why))
            else:
                chosen.append(impl)
        chosen = tuple(chosen)
    return Settings(
        shapes,
        chosen,
        resolved,
        dtype,
        repeats,
        warmup,
        threads,
        machine_copy_bytes(resolved) if machine_bytes is None else machine_bytes,
        memory_format,
        named=bool(named),
        skipped=tuple(skipped),
    )


# ---------------------------------------------------------------------------- measuring


def _cpu_kernel_ready(progress: Progress, required: bool) -> bool:
    """Load (compiling on first use) the C++ kernel before any timing."""
    from normbench.kernels import cpu

    name = cpu.extension_name()
    if (cpu.cache_root() / name / f"{name}.so").exists():
        progress.status("loading the CPU kernel")
    else:
        progress.status("compiling the CPU kernel (once per machine)")
    if cpu.extension() is not None:
        return True
    why = f"the C++ kernel could not be compiled ({cpu.failure()})"
    if required:
        raise UserError(f"impl 'cpu' cannot run here: {why}")
    from normbench import terminal

    progress.note(terminal.styled(("cpu left out", "yellow"), f": {why}"))
    return False


def _units(
    impls: Sequence[str], shape: Shape, device: str, dtype: str, memory_format: str = "contiguous"
) -> dict[str, tuple]:
    """Per implementation (and ``copy``): ``(prepare, run)``, only ``run`` being timed; the
    input and its gradient in ``memory_format``."""
    import torch

    from normbench.models import torch_memory_format
    from normbench.norms import BatchNorm2d

    torch_dtype = getattr(torch, dtype)
    fmt = torch_memory_format(memory_format)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(device, torch_dtype, memory_format=fmt)
    x.requires_grad_()
    dy = torch.randn(shape, generator=generator).to(device, torch_dtype, memory_format=fmt)
    channels = shape[1]

    def layer(module: torch.nn.Module) -> tuple:
        module.train()

        def prepare() -> None:
            module.weight.grad = None
            module.bias.grad = None
            x.grad = None

        def run() -> None:
            module(x).backward(dy)

        return prepare, run

    units = {}
    for impl in impls:
        if impl == "torch":
            module = torch.nn.BatchNorm2d(channels, device=device, dtype=torch_dtype)
        else:
            module = BatchNorm2d(channels, device=device, dtype=torch_dtype, backend=impl)
        units[impl] = layer(module)

    src = torch.randn(shape, generator=generator).to(device)  # float32, as documented
    dst = torch.empty_like(src)
    units[COPY] = (lambda: None, lambda: dst.copy_(src))
    return units


def copy_seconds(
    nbytes: int, repeats: int, device: str = "cpu", sync: Callable[[], None] = lambda: None
) -> list[float]:
    """The machine copy: ``repeats`` timed ``dst.copy_(src)`` of float32 arrays of ``nbytes``
    (after an untimed one, which also faults dst's pages in), in seconds."""
    import torch

    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = []
    for repeat in range(repeats + 1):
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        if repeat:
            seconds.append(time.perf_counter() - start)
    return seconds


def _machine_copy(
    config: Settings, repeats: int, sync: Callable[[], None], done: int = 0
) -> list[tuple]:
    """``repeats`` timed copies of ``config.machine_bytes``, as samples numbered on from
    ``done``."""
    seconds = copy_seconds(config.machine_bytes, repeats, config.device, sync)
    return [(MACHINE, COPY, repeat, t, 0) for repeat, t in enumerate(seconds, start=done + 1)]


def measure(config: Settings, progress: Progress | None = None) -> pd.DataFrame:
    """Raw samples: one row per (shape, impl, repeat), ``seconds`` and page ``faults`` of a
    unit; the machine copy's are the rows of shape ``MACHINE``."""
    import pandas as pd
    import torch

    from normbench import terminal

    progress = progress or _Silent()
    impls = config.impls
    if "cpu" in impls and not _cpu_kernel_ready(progress, required=config.named):
        impls = tuple(i for i in impls if i != "cpu")
    for impl, why in config.skipped:
        progress.note(terminal.text(f"{impl} left out: {why}", "dim"))
    cuda = config.device == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    # read before every unit: see the module docstring
    flush = torch.empty(FLUSH_BYTES[config.device] // 4, device=config.device).fill_(1.0)

    def timed(prepare: Callable[[], None], run: Callable[[], None]) -> tuple[float, int]:
        flush.sum()
        prepare()
        sync()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        run()
        sync()
        seconds = time.perf_counter() - start
        return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    progress.status("preparing the inputs")
    units = {
        shape_label(shape): _units(impls, shape, config.device, config.dtype, config.memory_format)
        for shape in config.shapes
    }
    progress.status("measuring the machine's copy bandwidth")
    machine = _machine_copy(config, MACHINE_REPEATS_FIRST, sync)
    progress.start(len(units) * (config.warmup + config.repeats))
    progress.status("warming up")
    for shape_units in units.values():
        for _ in range(config.warmup):
            for unit in shape_units.values():
                timed(*unit)
            progress.advance()
    progress.status("timing")
    order = random.Random(0)
    labels = list(units)
    rows = []
    gc.collect()
    gc.disable()  # a collection inside a unit would be charged to it
    try:
        for first in range(0, config.repeats, BLOCK):
            order.shuffle(labels)
            for label in labels:
                names = list(units[label])
                for name in names:  # untimed: back to this shape's steady state
                    timed(*units[label][name])
                for repeat in range(first, min(first + BLOCK, config.repeats)):
                    order.shuffle(names)
                    for name in names:
                        rows.append((label, name, repeat, *timed(*units[label][name])))
                    progress.advance()
            # the shapes' next block starts with an untimed round of its own: this copy
            # does not reach into their timings
            machine += _machine_copy(config, MACHINE_REPEATS_PER_BLOCK, sync, len(machine))
    finally:
        gc.enable()
    return pd.DataFrame(rows + machine, columns=["shape", "impl", "repeat", "seconds", "faults"])


def _device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _stream_bytes(config: Settings) -> int | None:
    """The CPU kernel's streaming threshold, where it was timed (and so is built)."""
    from normbench.kernels import ops

    library = ops.library() if "cpu" in config.impls else None
    return None if library is None else int(library.stream_threshold())


def _plane_order(config: Settings, shape: Shape) -> str | None:
    """The order the CPU kernel reads ``shape`` in, forward/backward (``samples/channels``),
    with this process's threads (as when it was timed); None where it was not timed."""
    import torch

    from normbench.kernels import ops
    from normbench.models import torch_memory_format

    library = ops.library() if "cpu" in config.impls else None
    if library is None:
        return None
    fmt = torch_memory_format(config.memory_format)
    x = torch.empty(shape, dtype=getattr(torch, config.dtype), memory_format=fmt)
    return f"{library.plane_order(x)}/{library.plane_order(x, True)}"


def timings(samples: pd.DataFrame, config: Settings, threads: int) -> pd.DataFrame:
    """:func:`measure`'s raw times as one row per (shape, impl), columns ``COLUMNS``."""
    import pandas as pd
    import torch

    from normbench import __version__, allocator

    itemsize = torch.empty((), dtype=getattr(torch, config.dtype)).element_size()
    device_name = _device_name(config.device)
    order = {name: i for i, name in enumerate((*IMPLS, COPY))}
    machine = samples.loc[samples["shape"] == MACHINE, "seconds"]
    machine_gbps = 2 * config.machine_bytes / machine.median() / 1e9 if len(machine) else math.nan
    stream_bytes = _stream_bytes(config)
    rows = []
    for shape in config.shapes:
        label = shape_label(shape)
        numel = shape[0] * shape[1] * shape[2] * shape[3]
        here = samples[samples["shape"] == label]
        stats = {}
        for impl, group in here.groupby("impl"):
            q1, median, q3 = (group["seconds"] * 1e3).quantile([0.25, 0.5, 0.75]).tolist()
            nbytes = 2 * numel * 4 if impl == COPY else 5 * numel * itemsize
            stats[impl] = {
                "median_ms": median,
                "q1_ms": q1,
                "q3_ms": q3,
                "min_ms": float(group["seconds"].min() * 1e3),
                "repeats": len(group),
                "bytes": nbytes,
                "gbps": nbytes / (median * 1e-3) / 1e9,
                "page_faults": float(group["faults"].mean()),
            }
        for impl in sorted(stats, key=order.__getitem__):
            row = stats[impl]
            torch_ms = stats["torch"]["median_ms"] if "torch" in stats else float("nan")
            speedup = float("nan") if impl == COPY else torch_ms / row["median_ms"]
            copy_gbps = stats[COPY]["gbps"] if COPY in stats else float("nan")
            rows.append(
                {
                    "shape": label,
                    "n": shape[0],
                    "c": shape[1],
                    "h": shape[2],
                    "w": shape[3],
                    "numel": numel,
                    "dtype": "float32" if impl == COPY else config.dtype,
                    "memory_format": config.memory_format,
                    "impl": impl,
                    **row,
                    "warmup": config.warmup,
                    "speedup_vs_torch": speedup,
                    "frac_of_copy_bw": row["gbps"] / copy_gbps,
                    "machine_copy_bytes": config.machine_bytes,
                    "machine_copy_gbps": machine_gbps,
                    "frac_of_machine_bw": row["gbps"] / machine_gbps,
                    "malloc": "kept" if allocator.tuned() else "system",
                    "stream_bytes": stream_bytes,
                    "plane_order": _plane_order(config, shape) if impl == "cpu" else None,
                    "device": config.device,
                    "device_name": device_name,
                    "threads": threads,
                    "torch_version": torch.__version__,
                    "normbench_version": __version__,
                }
            )
    return pd.DataFrame(rows, columns=list(COLUMNS))


def bench_to_csv(
    out_path: Path,
    shape_texts: Sequence[str] | None,
    impls: Iterable[str] | None,
    progress: Progress | None = None,
    **options,
) -> pd.DataFrame:
    """``normbench bench``: the shapes as typed (``"128,64,8,8"``; None: the defaults)
    measured by :func:`run_bench` (``options``: its keywords) and written to ``out_path``
    as CSV. The path is checked before minutes of measuring."""
    from normbench.rundir import check_writable, write_csv

    shapes = [parse_shape(text) for text in shape_texts] if shape_texts else None
    if out_path.is_dir():
        raise UserError(f"--out {out_path} is a folder: give a file name, as bench.csv")
    check_writable(out_path.parent)
    frame = run_bench(shapes, impls, progress=progress, **options)
    write_csv(out_path, frame)
    return frame


def run_bench(
    shapes: Iterable[Sequence[int]] | None = None,
    impls: Iterable[str] | None = None,
    *,
    device: str = "auto",
    dtype: str = "float32",
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    threads: int | None = None,
    machine_bytes: int | None = None,
    memory_format: str = "contiguous",
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Validate, measure and summarise: one row per (shape, impl), columns ``COLUMNS``.

    ``threads`` sets ``torch.set_num_threads`` for the measurement (restored after);
    None leaves torch's setting. Arguments as in :func:`settings`.
    """
    import torch

    from normbench import allocator

    config = settings(
        shapes,
        impls,
        device=device,
        dtype=dtype,
        repeats=repeats,
        warmup=warmup,
        threads=threads,
        machine_bytes=machine_bytes,
        memory_format=memory_format,
    )
    allocator.keep_freed_memory()  # as in training runs: no page faults from malloc's trimming
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        samples = measure(config, progress)
        return timings(samples, config, torch.get_num_threads())
    finally:
        torch.set_num_threads(before)
