"""Sweeps on real engines on this machine: submitit_local, joblib and a Ray cluster in a
loopback-only network namespace (SLURM's: tests/test_launchers_slurm.py).

Each engine is checked as a user meets it: a grid completes with its tables; a repeated
sweep launches nothing; a job lost at the launcher's level (``kill -9`` of a worker)
leaves its run ``interrupted`` with the reason, the sweep ends with counts and tables and
exit status 1, and the next sweep redoes only that run; each job runs with the threads it
was allotted; a signal to the driver, or its terminal closing, stops every run cleanly.

The Ray cluster is the project's own: ``tests/cluster/ray_up.sh`` for this module, stopped
by ``ray_down.sh``. Where that cannot be done (not root) the Ray tests skip with the
reason, except under CI (``CI`` set), where they fail. Every grid is tiny (digits, a few
hundred images).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from launched import REPO, TINY, lock_of, start_sweep, summaries, sweep, unavailable, wait_for
from pty_session import Terminal

CLUSTER = REPO / "tests" / "cluster"  # the test clusters' scripts: up and down by hand, too

# ------------------------------------------------------------------------ submitit_local


def test_submitit_local_shares_the_cores_and_records_a_killed_job(tmp_path):
    """Two jobs started at once on this machine each get cores // 2 threads; a job killed
    with SIGKILL is recorded interrupted; the rerun redoes only it."""
    from normbench.cores import affinity

    # 40 epochs: a second or more of training after the lock, for the kill to find it
    args = [*TINY, "epochs=2,40", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"]
    driver = start_sweep(tmp_path, *args)
    try:
        owner = wait_for(lambda: lock_of(tmp_path, 40), 120, "the 40-epoch run to start")
        os.kill(owner["pid"], signal.SIGKILL)
        out, err = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == 1, err
    assert "1 completed" in out and "1 interrupted" in out
    runs = summaries(tmp_path)
    cores = len(affinity())
    assert runs[2]["threads"] == max(1, cores // 2)
    assert runs[2]["threads_from"] == f"submitit_local: {cores} cores / 2 jobs"
    assert runs[40]["status"] == "interrupted"
    assert "exited without a result" in runs[40]["error"]  # what submitit_local can tell

    again = sweep(tmp_path, *args)
    assert again.returncode == 0, again.stderr
    assert "1 completed" in again.stdout and "1 skipped" in again.stdout


# ------------------------------------------------------------------------------ joblib


def test_joblib_a_killed_worker_is_recorded_and_the_sweep_ends(tmp_path):
    # 60 epochs: seconds of training, for both workers to be seen training at once
    args = [*TINY, "epochs=60,61", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    driver = start_sweep(tmp_path, *args)
    try:
        owner = wait_for(
            lambda: lock_of(tmp_path, 61) and lock_of(tmp_path, 60), 120, "both runs to start"
        )
        os.kill(owner["pid"], signal.SIGKILL)  # as the OOM killer would
        out, err = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == 1, err
    assert "Traceback" not in err
    runs = summaries(tmp_path)
    assert runs[60]["status"] == "interrupted"
    assert "TerminatedWorkerError" in runs[60]["error"]
    assert (tmp_path / "results" / "default" / "runs.csv").is_file()
    # joblib stops the other worker too: its run is interrupted, or finished first
    assert runs[61]["status"] in ("interrupted", "completed")
    # (that the next sweep resumes interrupted runs is tests/test_sweep.py's and the SLURM
    # tests'; here it cost 16-20 s of the suite)


def test_joblib_workers_do_not_outlive_a_killed_driver(tmp_path):
    args = [*TINY, "epochs=100000,100001", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    driver = start_sweep(tmp_path, *args, quiet=True)
    try:
        owners = wait_for(
            lambda: (
                (a := lock_of(tmp_path, 100000)) and (b := lock_of(tmp_path, 100001)) and (a, b)
            ),
            120,
            "both runs to start",
        )
    finally:
        driver.kill()  # SIGKILL: the driver cannot clean up
        driver.wait()
    workers = [owner["pid"] for owner in owners]
    wait_for(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers) or None,
        30,
        "the workers to stop",
    )
    runs = wait_for(
        lambda: len(summaries(tmp_path)) == 2 and summaries(tmp_path), 10, "the runs' records"
    )
    assert {r["error"] for r in runs.values()} == {"the sweep's driver process died"}


@pytest.mark.parametrize(
    ("signum", "status", "said"),
    [(signal.SIGTERM, 143, "terminated by SIGTERM"), (signal.SIGINT, 130, "SIGINT (Ctrl-C)")],
)
def test_joblib_a_signal_to_the_driver_stops_every_run_cleanly(tmp_path, signum, status, said):
    """`kill` (or `kill -INT`) of a joblib sweep's driver alone: the driver passes the
    signal on to its workers, each records its run interrupted and releases its lock,
    and the driver exits with 128 + the signal (was, for SIGTERM: the workers killed
    outright, no summaries, stale locks)."""
    args = [*TINY, "epochs=100000,100001", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    driver = start_sweep(tmp_path, *args)
    try:
        wait_for(
            lambda: lock_of(tmp_path, 100000) and lock_of(tmp_path, 100001),
            120,
            "both runs to start",
        )
        driver.send_signal(signum)
        out, err = driver.communicate(timeout=120)
    finally:
        driver.kill()
    assert driver.returncode == status, err
    assert f"{said}" in err and "Traceback" not in err
    runs = summaries(tmp_path)
    assert len(runs) == 2 and {r["status"] for r in runs.values()} == {"interrupted"}
    assert all(said in r["error"] for r in runs.values())
    assert not list((tmp_path / "results" / "default" / "runs").glob("*/.lock"))


def test_joblib_closing_the_terminal_stops_every_run_cleanly(tmp_path):
    """The terminal of a joblib sweep closed: driver and workers get SIGHUP (the worker
    twice, from the shell and from its driver) and write to a hung-up terminal. Every
    run is recorded interrupted, no lock stays, the driver exits 129 (was: all died at
    once, no summaries, stale locks)."""
    args = [*TINY, "epochs=100000,100001", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    command = [sys.executable, "-m", "normbench.cli", "sweep", *args]
    with Terminal(command, cwd=tmp_path) as term:
        owners = wait_for(
            lambda: (
                (a := lock_of(tmp_path, 100000)) and (b := lock_of(tmp_path, 100001)) and (a, b)
            ),
            120,
            "both runs to start",
        )
        term.close()
        assert term.process.wait(timeout=120) == 129
    wait_for(
        lambda: not any(Path(f"/proc/{o['pid']}").exists() for o in owners) or None,
        30,
        "the workers to end",
    )
    runs = summaries(tmp_path)
    assert len(runs) == 2 and {r["status"] for r in runs.values()} == {"interrupted"}
    assert all("SIGHUP" in r["error"] for r in runs.values())
    assert not list((tmp_path / "results" / "default" / "runs").glob("*/.lock"))


def test_a_stopped_sweep_records_runs_whose_process_died_and_frees_their_locks(tmp_path):
    """What the driver does after its launcher ended on a stop (launchers.settle): a run
    still locked by a process that died before recording it (a worker killed outright)
    is recorded interrupted and its lock removed; a run that recorded itself keeps its
    reason, and its stale lock goes too."""
    from normbench import launchers
    from normbench import sweep as sweeps
    from normbench.rundir import read_summary
    from normbench.runner import record_unfinished

    plan = sweeps.plan([*TINY, f"out_dir={tmp_path}", "epochs=1,2"])
    lost, recorded = plan.to_run
    record_unfinished(recorded.cfg, "interrupted", "its own reason")
    for job in plan.to_run:  # a real process takes the lock and is killed holding it
        job.run_dir.mkdir(parents=True, exist_ok=True)
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, time; from normbench.lock import RunLock; "
                "RunLock(sys.argv[1]).acquire(); print(flush=True); time.sleep(60)",
                str(job.run_dir),
            ],
            stdout=subprocess.PIPE,
        )
        holder.stdout.readline()
        holder.kill()
        holder.wait()
        assert (job.run_dir / ".lock").exists()
    launchers.settle(plan, "terminated by SIGTERM (kill, or a scheduler's cancel)")
    assert read_summary(lost.run_dir)["status"] == "interrupted"
    assert read_summary(lost.run_dir)["error"].startswith("terminated by SIGTERM")
    assert read_summary(recorded.run_dir)["error"] == "its own reason"
    assert not list(tmp_path.rglob(".lock"))


# ------------------------------------------------------------------------------ Ray

NETNS = f"nbray{os.getpid()}"


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster (2 CPUs) in a network namespace with only loopback: Ray binds
    every address it finds, so it is kept off the machine's network."""
    try:
        import hydra_plugins.hydra_ray_launcher  # noqa: F401
    except ImportError:
        pytest.skip("Ray's launcher is not installed (pip install -e '.[ray]')")
    if os.geteuid() != 0 or not shutil.which("ip"):
        unavailable("a loopback-only network namespace for Ray needs root and iproute2")
    # this environment's ray, the one whose hydra-ray-launcher the sweeps use
    env = {**os.environ, "RAY": str(Path(sys.executable).with_name("ray"))}
    try:
        up = subprocess.run(
            ["bash", str(CLUSTER / "ray_up.sh"), NETNS],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if up.returncode != 0:
            pytest.fail(f"ray_up.sh failed:\n{up.stdout[-2000:]}{up.stderr[-2000:]}")
        yield NETNS
    finally:
        subprocess.run(["bash", str(CLUSTER / "ray_down.sh"), NETNS], capture_output=True)


RAY = [
    "hydra/launcher=ray",
    "hydra.launcher.ray.init.address=auto",
    "+hydra.launcher.ray.init.object_store_memory=null",
]


def ray_sweep(netns: str, cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "normbench.cli", "sweep", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=400,
    )


def test_ray_sweep_uses_num_cpus_and_a_rerun_launches_nothing(ray_cluster, tmp_path):
    args = [*TINY, "epochs=1,2", *RAY, "+hydra.launcher.ray.remote.num_cpus=1"]
    first = ray_sweep(ray_cluster, tmp_path, *args)
    assert first.returncode == 0, first.stderr
    assert "2 completed" in first.stdout
    runs = summaries(tmp_path)
    assert {(r["threads"], r["threads_from"]) for r in runs.values()} == {(1, "Ray num_cpus")}
    launches = list((tmp_path / "results" / "default" / ".hydra").iterdir())

    again = ray_sweep(ray_cluster, tmp_path, *args)
    assert again.returncode == 0, again.stderr
    assert "2 skipped" in again.stdout
    # no Ray task: nothing was handed to the launcher at all
    assert list((tmp_path / "results" / "default" / ".hydra").iterdir()) == launches


def test_a_submission_refused_for_a_passing_reason_is_tried_again(monkeypatch, capsys):
    """sbatch timing out on a busy controller is tried again (and said on stderr); a
    refusal the user must fix raises at once with sbatch's last error line."""
    from normbench import launchers

    monkeypatch.setattr(launchers, "SUBMIT_RETRY_S", (0.0, 0.0))

    class Executor:
        def __init__(self, errors):
            self.errors, self.calls = list(errors), 0

        def map_array(self, fn, *args):
            self.calls += 1
            if self.errors:
                raise RuntimeError(self.errors.pop(0))
            return [fn(*a) for a in zip(*args, strict=True)]

    busy = "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation"
    executor = Executor([busy, busy])
    assert launchers._submit(executor, lambda x: x * 2, [(1,), (2,)]) == [2, 4]
    assert executor.calls == 3
    assert capsys.readouterr().err.count("trying again in 0 s") == 2

    executor = Executor([busy] * 3)
    with pytest.raises(RuntimeError, match="Socket timed out"):
        launchers._submit(executor, lambda x: x, [(1,)])
    assert executor.calls == 3

    wrong = "sbatch: error: invalid partition\nsbatch: error: Batch job submission failed: nope"
    executor = Executor([wrong])
    with pytest.raises(launchers.SubmissionRefused) as refused:
        launchers._submit(executor, lambda x: x, [(1,)])
    assert str(refused.value) == "sbatch: error: Batch job submission failed: nope"
    assert executor.calls == 1


def test_a_lost_jobs_reason_keeps_the_runs_own_unless_the_scheduler_says_more(tmp_path):
    """A job that ended between two sacct calls has submitit's state UNKNOWN: the run's
    own reason (its time-limit handler's) stays first, as for FAILED (was: replaced by
    "unknown (UNKNOWN)"). A state that says more, as CANCELLED, replaces it."""
    from normbench import launchers
    from normbench import sweep as sweeps
    from normbench.rundir import read_summary
    from normbench.runner import record_unfinished

    class SlurmJob:  # submitit's handle, as _lost_reason reads it
        def __init__(self, state):
            self.state, self.job_id = state, "7"

    own = "SLURM time limit or preemption: Job not requeued"
    for state, expected in (
        ("UNKNOWN", f"{own}; SLURM job 7: ended, its state not known to sacct (UNKNOWN)"),
        ("FAILED", f"{own}; SLURM job 7: exited with an error (FAILED)"),
        ("CANCELLED by 0", "SLURM job 7: cancelled (CANCELLED by 0)"),
    ):
        (job,) = sweeps.plan([*TINY, f"out_dir={tmp_path / state[:6]}"]).to_run
        record_unfinished(job.cfg, "interrupted", own)
        reason, specific = launchers._lost_reason(SlurmJob(state), RuntimeError("no result"))
        launchers._record_lost([job], reason, slurm_job="7", keep_own=not specific)
        run = read_summary(job.run_dir)
        assert run["status"] == "interrupted" and run["error"] == expected


def test_a_job_that_failed_before_its_run_began_is_recorded(tmp_path):
    """SLURM may send the time-limit signal in the job's first second (its resolution is
    60 s), while Hydra sets the job up: submitit's error then comes back as a failed
    JobReturn, and the run, which never started, is recorded interrupted with the reason
    (was: "1 not run", no reason anywhere). A job's own failure is recorded failed; a run
    that recorded itself is left as it is."""
    from hydra.core.utils import JobReturn, JobStatus
    from submitit.core.utils import UncompletedJobError

    from normbench import launchers
    from normbench import sweep as sweeps
    from normbench.rundir import read_summary
    from normbench.runner import record_unfinished

    args = [*TINY, f"out_dir={tmp_path}", "epochs=1,2,3"]
    early, broken, done = sweeps.plan(args).to_run

    def failed(err: Exception) -> JobReturn:
        ret = JobReturn()
        ret.status, ret._return_value = JobStatus.FAILED, err
        return ret

    record_unfinished(done.cfg, "interrupted", "its own reason")  # the run's own record
    limit = UncompletedJobError("Job not requeued because: timed-out too many times.")
    launchers._record_failed_returns(
        [
            (early, failed(limit)),
            (broken, failed(RuntimeError("boom\nmore"))),
            (done, failed(RuntimeError("later"))),
        ]
    )
    first, second = read_summary(early.run_dir), read_summary(broken.run_dir)
    assert first["status"] == "interrupted"
    assert first["error"].startswith("SLURM time limit or preemption: Job not requeued")
    assert second["status"] == "failed" and second["error"] == "RuntimeError: boom"
    assert read_summary(done.run_dir)["error"] == "its own reason"
    # interrupted runs are redone by the next sweep, a failed one only with --retry-failed
    assert len(sweeps.plan(args).to_run) == 2
