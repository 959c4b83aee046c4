"""Tests for normbench.cores: a run's threads come from what its launcher allots, less the
cores other processes keep busy; ``threads=`` wins."""

from __future__ import annotations

import pytest

from normbench import cores


@pytest.fixture
def two_cores(monkeypatch):
    """A process that may use 2 CPUs, outside any launcher."""
    monkeypatch.setattr(cores, "affinity", lambda: {0, 1})
    for name in ("SLURM_JOB_ID", "SLURM_CPUS_PER_TASK", cores.CONCURRENT_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cores, "_launcher", lambda: {})
    monkeypatch.setattr(cores, "_ray_cpus", lambda: None)
    return monkeypatch


def test_explicit_threads_win(two_cores):
    two_cores.setenv("SLURM_JOB_ID", "1")
    two_cores.setenv("SLURM_CPUS_PER_TASK", "1")
    assert cores.choose(2) == cores.Threads(2, "threads=")


def test_explicit_threads_above_the_cpus_are_capped_with_a_notice(two_cores):
    from normbench.errors import Notice

    with pytest.warns(Notice, match="threads=1000 is more than the 2 CPUs"):
        assert cores.choose(1000) == cores.Threads(2, "threads=1000, capped at 2 CPUs")


def test_outside_a_launcher_the_affinity_mask(two_cores):
    assert cores.allotment() == cores.Threads(2, "affinity mask")


def test_slurm_cpus_per_task_then_its_affinity_mask(two_cores):
    two_cores.setenv("SLURM_JOB_ID", "12")
    two_cores.setenv("SLURM_CPUS_PER_TASK", "1")
    assert cores.allotment() == cores.Threads(1, "SLURM_CPUS_PER_TASK")
    two_cores.delenv("SLURM_CPUS_PER_TASK")
    assert cores.allotment() == cores.Threads(2, "SLURM affinity mask")


def test_ray_num_cpus(two_cores):
    two_cores.setattr(cores, "_ray_cpus", lambda: 1)
    assert cores.allotment() == cores.Threads(1, "Ray num_cpus")


@pytest.mark.parametrize(
    "n_jobs, concurrent, expected",
    [(2, None, 1), (-1, None, 1), (1, None, 2), (4, None, 1), (2, "1", 2)],
)
def test_joblib_shares_the_cores_among_the_jobs_at_once(two_cores, n_jobs, concurrent, expected):
    two_cores.setattr(cores, "_launcher", lambda: {"n_jobs": n_jobs})
    if concurrent:
        two_cores.setenv(cores.CONCURRENT_ENV, concurrent)
    assert cores.allotment().count == expected


def test_submitit_local_cpus_per_task_or_a_share(two_cores):
    target = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
    two_cores.setattr(cores, "_launcher", lambda: {"_target_": target, "cpus_per_task": None})
    two_cores.setenv(cores.CONCURRENT_ENV, "2")
    assert cores.allotment() == cores.Threads(1, "submitit_local: 2 cores / 2 jobs")
    two_cores.setattr(cores, "_launcher", lambda: {"_target_": target, "cpus_per_task": 2})
    assert cores.allotment() == cores.Threads(2, "submitit cpus_per_task")


@pytest.mark.parametrize("idle, expected", [(2.0, 2), (1.8, 2), (1.6, 1), (1.0, 1), (0.1, 1)])
def test_busy_cores_are_left_to_their_processes(two_cores, idle, expected):
    two_cores.setattr(cores, "idle_cores", lambda cpus, sample_s=cores.SAMPLE_S: idle)
    chosen = cores.choose(None)
    assert chosen.count == expected
    assert chosen.source == "affinity mask" + ("" if expected == 2 else ", 1 of 2 idle")


def test_idle_cores_are_measured_from_proc_stat(two_cores):
    """Two samples of /proc/stat: one CPU fully idle, the other fully busy."""
    samples = iter([{0: (100, 200), 1: (50, 200)}, {0: (110, 210), 1: (50, 210)}])
    two_cores.setattr(cores, "_cpu_times", lambda cpus: next(samples))
    assert cores.idle_cores({0, 1}, sample_s=0) == pytest.approx(1.0)


def test_this_machines_proc_stat_reads():
    measured = cores.idle_cores(cores.affinity(), sample_s=0.05)
    assert measured is None or 0 <= measured <= len(cores.affinity()) + 1e-9


def test_a_data_parallel_runs_threads_are_shared_and_too_many_processes_said(monkeypatch):
    """Each process gets its share (at least one thread), the source saying how; more
    processes than CPUs is one Notice from the launcher (it ran 32 to a core unsaid)."""
    import warnings

    from normbench.errors import Notice

    monkeypatch.setattr(cores, "affinity", lambda: {0, 1})
    total = cores.Threads(2, "affinity mask")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none: 2 processes on 2 CPUs
        cores.warn_oversubscribed(2)
        share = cores.per_process(total, 2)  # the ranks' own shares say nothing
    assert share == cores.Threads(1, "affinity mask; 2 over 2 processes")
    with pytest.warns(Notice, match=r"processes=64 is more than the 2 CPUs .* about 32 processes"):
        cores.warn_oversubscribed(64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cores.per_process(total, 64).count == 1
