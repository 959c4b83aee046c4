"""How many CPU threads a run uses: what its launcher allots to the job, less busy cores.

torch's default, every core the process can see, is the wrong answer for a job that
shares its machine: two jobs of 2 threads on 2 cores, or one next to another busy
process, run much slower than with 1 thread each (measured on 2-core VMs, also
next to one busy process on the ``quick`` preset's runs: benchmarks/README.md). So a run
takes, unless ``threads=`` says otherwise:

1. its **allotment**: on SLURM, ``SLURM_CPUS_PER_TASK`` or else the affinity mask SLURM
   set; in a Ray task, the CPUs Ray assigned it; under Hydra's joblib launcher,
   cores // the jobs running at once; under submitit_local, ``cpus_per_task`` or
   cores // the jobs started at once; otherwise the affinity mask (every core the
   process may use);
2. then, of those cores, the ones not kept busy by other processes when the run starts
   (sampled from ``/proc/stat`` for 0.1 s), at least 1. On an idle machine this is the
   whole allotment, where more threads pay (faster steps at batch 8-128 on 28x28 or
   32x32 images, 2 cores: benchmarks/README.md); next to a busy process it is what is left.

The run records the number and where it came from (``threads``, ``threads_from``).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: Set by a sweep for its jobs: how many of them its launcher starts at once.
CONCURRENT_ENV = "NORMBENCH_CONCURRENT_JOBS"

#: How long the load of the other processes is sampled, in seconds.
SAMPLE_S = 0.1


@dataclass(frozen=True)
class Threads:
    count: int
    source: str  # where the number came from, as recorded in the summary


def affinity() -> set[int]:
    """The CPUs this process may run on (SLURM's and taskset's mask, not the machine's count)."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return set(range(os.cpu_count() or 1))


def _positive_int(text) -> int | None:
    try:
        value = int(str(text))
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def _ray_cpus() -> int | None:
    ray = sys.modules.get("ray")  # only where the job runs inside Ray: never imported here
    if ray is None or not ray.is_initialized():
        return None
    try:  # in the driver this is empty (or refused): only a task is assigned CPUs
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # an older or newer Ray without it: fall back to the mask
        return None
    return max(1, int(cpus)) if cpus else None


def _launcher() -> dict:
    """The Hydra launcher's settings when this process runs a Hydra job, else {}."""
    if "hydra" not in sys.modules:
        return {}
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    launcher = HydraConfig.get().launcher
    wanted = ("_target_", "n_jobs", "cpus_per_task")
    return {key: launcher[key] for key in launcher if key in wanted}


def allotment() -> Threads:
    """The CPUs the launcher gave this job (see the module's docstring)."""
    cores = len(affinity())
    if os.environ.get("SLURM_JOB_ID"):
        per_task = _positive_int(os.environ.get("SLURM_CPUS_PER_TASK"))
        if per_task:
            return Threads(min(per_task, cores), "SLURM_CPUS_PER_TASK")
        return Threads(cores, "SLURM affinity mask")
    ray_cpus = _ray_cpus()
    if ray_cpus:
        return Threads(ray_cpus, "Ray num_cpus")
    launcher = _launcher()
    concurrent = _positive_int(os.environ.get(CONCURRENT_ENV))
    target = str(launcher.get("_target_", ""))
    if "n_jobs" in launcher:  # joblib
        n_jobs = launcher["n_jobs"]
        at_once = cores if n_jobs is None or n_jobs < 0 else max(1, n_jobs)
        at_once = min(at_once, concurrent or at_once)
        return Threads(max(1, cores // at_once), f"joblib: {cores} cores / {at_once} jobs")
    if target.endswith("LocalLauncher"):  # submitit_local runs every job at once
        per_task = _positive_int(launcher.get("cpus_per_task"))
        if per_task:
            return Threads(min(per_task, cores), "submitit cpus_per_task")
        at_once = concurrent or 1
        return Threads(max(1, cores // at_once), f"submitit_local: {cores} cores / {at_once} jobs")
    return Threads(cores, "affinity mask")


def _cpu_times(cpus: set[int]) -> dict[int, tuple[int, int]]:
    """(idle, total) jiffies per CPU in ``cpus``, from /proc/stat."""
    times = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        cpu = int(name[3:])
        if cpu in cpus:
            fields = [int(x) for x in rest.split()]
            idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
            times[cpu] = (idle, sum(fields[:8]))
    return times


def idle_cores(cpus: set[int], sample_s: float = SAMPLE_S) -> float | None:
    """How many of ``cpus`` were idle over ``sample_s`` seconds, or None without /proc/stat."""
    try:
        before = _cpu_times(cpus)
        time.sleep(sample_s)
        after = _cpu_times(cpus)
    except (OSError, ValueError):
        return None
    idle = 0.0
    for cpu, (idle0, total0) in before.items():
        idle1, total1 = after.get(cpu, (idle0, total0))
        if total1 > total0:
            idle += (idle1 - idle0) / (total1 - total0)
        else:  # no tick counted in the window: assume idle
            idle += 1.0
    return idle


def choose(threads: int | None) -> Threads:
    """The run's thread count: ``threads`` when set, else the allotment's idle cores.

    ``threads`` above the CPUs this process may use (its affinity mask) is capped there,
    with a :class:`~normbench.errors.Notice`: more threads than cores only wait on each
    other (``threads=1000`` took minutes a step). Capped, not refused, because a sweep's
    jobs may run on other machines (a cluster's nodes) than the one that planned them."""
    if threads is not None:
        cpus = len(affinity())
        if threads > cpus:
            import warnings

            from normbench.errors import Notice

            warnings.warn(
                f"threads={threads} is more than the {cpus} CPUs this process may use: "
                f"the run uses {cpus}",
                Notice,
                stacklevel=2,
            )
            return Threads(cpus, f"threads={threads}, capped at {cpus} CPUs")
        return Threads(threads, "threads=")
    given = allotment()
    idle = idle_cores(affinity())
    if idle is None or given.count == 1:
        return given
    # Round down unless nearly a whole core is free: a half-busy core still slows
    # every step that waits for it.
    usable = max(1, min(given.count, int(idle + 0.3)))
    if usable == given.count:
        return given
    return Threads(usable, f"{given.source}, {usable} of {given.count} idle")


def warn_oversubscribed(processes: int) -> None:
    """A :class:`~normbench.errors.Notice` where a data-parallel run's processes outnumber
    the CPUs this process may use (``processes=64`` on 2 cores ran 32 to a core, without a
    word). Said once, by the launcher."""
    cpus = len(affinity())
    if processes > cpus:
        import warnings

        from normbench.errors import Notice

        warnings.warn(
            f"processes={processes} is more than the {cpus} CPUs this process may use: "
            f"about {-(-processes // cpus)} processes share each CPU, one thread each "
            "(on a CPU, processes study the normalization batch, not speed)",
            Notice,
            stacklevel=2,
        )


def per_process(threads: Threads, processes: int) -> Threads:
    """One process's share of a data-parallel run's ``threads`` (at least one each), its
    source saying so."""
    share = max(1, threads.count // processes)
    return Threads(share, f"{threads.source}; {threads.count} over {processes} processes")
