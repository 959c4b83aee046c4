"""Sweeps on real engines: a one-node SLURM cluster, submitit_local, joblib and a Ray
cluster in a loopback-only network namespace.

Each engine is checked as a user meets it: a grid completes with its tables; a repeated
sweep launches nothing (``sacct`` shows no new job); a job lost at the launcher's level
(``scancel``, a time limit, ``kill -9`` of a worker) leaves its run ``interrupted`` with
the reason, the sweep ends with counts and tables and exit status 1, and the next sweep
redoes only that run; each job runs with the threads it was allotted; Ctrl-C on the
driver cancels its jobs.

The clusters are the project's own (``tests/cluster/``): the SLURM cluster is brought up
by ``tests/cluster/slurm_up.sh`` (or the script ``NORMBENCH_SLURM_UP`` names) when it is
not up, and left up; the Ray cluster by ``tests/cluster/ray_up.sh`` for this module and
stopped by ``ray_down.sh``. Where that cannot be done (not root) the SLURM and Ray tests
skip with the reason, except under CI (``CI`` set), where they fail. Every grid is tiny
(digits, a few hundred images).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from pty_session import Terminal

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "tests" / "cluster"  # the test clusters' scripts: up and down by hand, too
SLURM_UP = Path(os.environ.get("NORMBENCH_SLURM_UP", CLUSTER / "slurm_up.sh"))

TINY = ["dataset.train_size=256", "batch_size=16", "norm=layer"]


def unavailable(reason: str):
    """Skip, with the reason; under CI a missing engine is a failure, never a skip."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test: {reason}")
    pytest.skip(reason)


def sweep(cwd: Path, *overrides: str, timeout: float = 400) -> subprocess.CompletedProcess:
    """``normbench sweep`` as a user runs it, from ``cwd`` (results go to cwd/results)."""
    return subprocess.run(
        [sys.executable, "-m", "normbench.cli", "sweep", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_sweep(cwd: Path, *overrides: str, quiet: bool = False) -> subprocess.Popen:
    """``normbench sweep`` started in the background from ``cwd``, its output piped as
    text (``quiet``: discarded), for a test to act on while it runs."""
    output = subprocess.DEVNULL if quiet else subprocess.PIPE
    return subprocess.Popen(
        [sys.executable, "-m", "normbench.cli", "sweep", *overrides],
        cwd=cwd,
        stdout=output,
        stderr=output,
        text=not quiet,
    )


def summaries(cwd: Path, name: str = "default") -> dict[int, dict]:
    """Each run's summary by its epochs (the tests sweep epochs to tell runs apart)."""
    found = {}
    for path in (cwd / "results" / name / "runs").glob("*/summary.json"):
        record = json.loads(path.read_text())
        found[record["epochs"]] = record
    return found


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def lock_of(cwd: Path, epochs: int) -> dict | None:
    """The lock record of the run with ``epochs`` epochs, once it trains."""
    for path in (cwd / "results" / "default" / "runs").glob("*/config.yaml"):
        if f"\nepochs: {epochs}\n" in f"\n{path.read_text()}":
            try:
                return json.loads((path.parent / ".lock").read_text())
            except (OSError, ValueError):
                return None
    return None


# ------------------------------------------------------------------------------ SLURM


def _slurm_ready() -> bool:
    if not shutil.which("sinfo") or not shutil.which("sacct"):
        return False
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    accounting = subprocess.run(["sacct", "-n", "-X", "-S", "now-1minutes"], capture_output=True)
    return state.returncode == 0 and "idle" in state.stdout + "mixed" and not accounting.returncode


@pytest.fixture(scope="module")
def slurm():
    """A one-node SLURM cluster with accounting (sacct), up for the module's tests."""
    if not _slurm_ready():
        if os.geteuid() != 0:
            unavailable("no SLURM cluster here, and bringing one up needs root")
        if not SLURM_UP.is_file():
            unavailable(f"no SLURM cluster here, and no {SLURM_UP} to bring one up")
        up = subprocess.run(["bash", str(SLURM_UP)], capture_output=True, text=True, timeout=600)
        if up.returncode != 0 or not _slurm_ready():
            pytest.fail(f"{SLURM_UP} failed:\n{up.stdout[-2000:]}{up.stderr[-2000:]}")
    return dt.datetime.now() - dt.timedelta(minutes=1)


def slurm_jobs(name: str) -> dict[str, str]:
    """Job id -> state of the SLURM jobs named ``name`` (array tasks one by one)."""
    listed = subprocess.run(
        ["sacct", "-n", "-X", "-P", "--name", name, "-S", "now-3hours", "-o", "JobID,State"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split("|", 1) for line in listed.splitlines() if line)


def slurm_args(name: str, *more: str) -> list[str]:
    return [
        "hydra/launcher=submitit_slurm",
        f"hydra.launcher.name={name}",
        "hydra.launcher.cpus_per_task=1",
        *more,
    ]


def test_slurm_grid_completes_a_cancelled_job_is_redone_and_a_rerun_submits_nothing(
    slurm, tmp_path
):
    """Two runs: one completes, one is scancelled while it trains. The sweep ends normally
    with counts and tables (exit 1); the next sweep redoes only the cancelled run, each job
    with the one CPU it was given; the one after finds the grid done and submits nothing
    (one grid for the three: a SLURM sweep costs tens of seconds here)."""
    name = f"nb{uuid.uuid4().hex[:8]}"
    # 40 epochs: a second or more of training after the lock, for the scancel to find it
    args = [*TINY, "epochs=1,40", *slurm_args(name, "hydra.launcher.timeout_min=5")]
    driver = start_sweep(tmp_path, *args)
    try:
        owner = wait_for(lambda: lock_of(tmp_path, 40), 120, "the 40-epoch run to start")
        subprocess.run(["scancel", owner["slurm_job"]], check=True)
        out, err = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == 1, err
    assert "1 completed" in out and "1 interrupted" in out
    runs = summaries(tmp_path)
    assert runs[1]["status"] == "completed"
    assert runs[40]["status"] == "interrupted"
    assert f"SLURM job {owner['slurm_job']}: cancelled" in runs[40]["error"]
    assert (tmp_path / "results" / "default" / "summary.csv").is_file()
    assert not list((tmp_path / "results" / "default" / "runs").glob("*/.lock"))

    before = slurm_jobs(name)
    redo = sweep(tmp_path, *args)  # no --retry-failed
    assert redo.returncode == 0, redo.stderr
    assert "1 completed" in redo.stdout and "1 skipped" in redo.stdout
    runs = summaries(tmp_path)
    assert {r["status"] for r in runs.values()} == {"completed"} and len(runs) == 2
    # each job ran with the one CPU it was given
    assert {(r["threads"], r["threads_from"]) for r in runs.values()} == {
        (1, "SLURM_CPUS_PER_TASK")
    }
    for table in ("runs.csv", "summary.csv", "metrics.csv"):
        assert (tmp_path / "results" / "default" / table).is_file()
    jobs = slurm_jobs(name)
    assert len(jobs) == len(before) + 1
    # the two jobs that trained a run to its end, and the cancelled one
    assert sorted(state.split()[0] for state in jobs.values()) == [
        "CANCELLED",
        "COMPLETED",
        "COMPLETED",
    ]

    again = sweep(tmp_path, *args)
    assert again.returncode == 0, again.stderr
    assert "2 skipped" in again.stdout and "0 completed" in again.stdout
    assert slurm_jobs(name) == jobs  # no job submitted


def test_slurm_a_data_parallel_sweep_runs_each_job_as_a_task_per_process(slurm, tmp_path):
    """processes=2 on SLURM: each job is 2 tasks of one CPU (sacct: the job's step has 2
    tasks), each task a rank; the runs complete as world size 2, and sync_bn's losses
    and accuracies, epoch by epoch, are those of the same runs on one process under
    custom_bn (the global batch's statistics either way), trained here."""
    import pandas as pd

    from normbench import runner
    from normbench.config import compose

    name = f"nb{uuid.uuid4().hex[:8]}"
    run = ["dataset.train_size=256", "batch_size=32", "epochs=2", "eval.bn_stats=false",
           "eval.precise_bn_images=64"]  # fmt: skip
    args = [*run, "norm=sync_bn", "processes=2", "seed=0,1"]
    done = sweep(tmp_path, *args, *slurm_args(name, "hydra.launcher.timeout_min=5"), timeout=180)
    assert done.returncode == 0, done.stderr
    assert "2 completed" in done.stdout
    runs = {}
    for path in (tmp_path / "results" / "default" / "runs").glob("*/summary.json"):
        record = json.loads(path.read_text())
        runs[record["seed"]] = (record, path.parent)
    assert sorted(runs) == [0, 1]
    for record, _ in runs.values():
        assert record["status"] == "completed"
        assert (record["world_size"], record["processes"], record["nodes"]) == (2, 2, 1)
        assert (record["threads"], record["threads_from"]) == (1, "SLURM_CPUS_PER_TASK")
    steps = subprocess.run(
        ["sacct", "-n", "-P", "--name", name, "-S", "now-3hours", "-o", "JobID,NTasks,State"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    # each job's step (its srun): 2 tasks, completed
    tasks = [line.split("|") for line in steps if line.split("|")[0].endswith(".0")]
    assert len(tasks) == 2 and all(t[1:] == ["2", "COMPLETED"] for t in tasks), steps

    def metrics(folder: Path) -> pd.Series:
        frame = pd.read_csv(folder / "metrics.csv")
        wanted = frame[frame.metric.isin(["loss", "acc"])]
        return wanted.set_index(["epoch", "split", "metric"]).value.sort_index()

    for seed, (_, folder) in runs.items():
        out = f"out_dir={tmp_path / 'one'}"
        alone = runner.run(compose([*run, "norm=custom_bn", f"seed={seed}", out, "threads=1"]))
        assert alone.summary["world_size"] == 1
        pd.testing.assert_series_equal(
            metrics(folder), metrics(alone.run_dir), rtol=1e-5, atol=1e-6
        )


def test_slurm_time_limit_is_recorded_as_interrupted(slurm, tmp_path):
    """A run longer than its job's time limit: SLURM's time-limit signal (SIGUSR2,
    ``signal_delay_s`` before the limit, or up to 60 s earlier) reaches submitit, which
    cannot requeue (``max_num_timeout=0``); the run is recorded interrupted, not failed,
    and the next sweep would redo it."""
    name = f"nb{uuid.uuid4().hex[:8]}"
    args = [
        *TINY,
        "epochs=100000",
        *slurm_args(name, "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=30"),
    ]
    done = sweep(tmp_path, *args, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "1 interrupted" in done.stdout, done.stderr
    (run,) = summaries(tmp_path).values()
    assert run["status"] == "interrupted" and "time limit" in run["error"]
    os.chdir(tmp_path)  # the grid's relative out_dir
    try:
        from normbench import sweep as sweeps

        assert len(sweeps.plan(args).to_run) == 1
    finally:
        os.chdir(REPO)


def test_slurm_refusing_the_jobs_is_one_line_and_exit_2(slurm, tmp_path):
    """sbatch refuses a partition that does not exist: the scheduler's words, exit 2, no
    job files and no run folders left; a refusal for a reason the user must fix is not
    tried again."""
    name = f"nb{uuid.uuid4().hex[:8]}"
    done = sweep(tmp_path, *TINY, *slurm_args(name, "hydra.launcher.partition=nosuch"))
    assert done.returncode == 2, done.stderr
    assert (
        "error: the scheduler refused the sweep's jobs: sbatch: error: Batch job submission "
        "failed: Invalid partition name specified"
    ) in done.stderr
    assert "trying again" not in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "results" / "default" / "runs").exists()
    assert not list((tmp_path / "results").rglob("*.pkl"))


def test_slurm_ctrl_c_cancels_the_sweeps_jobs(slurm, tmp_path):
    name = f"nb{uuid.uuid4().hex[:8]}"
    args = [*TINY, "epochs=100000,100001", *slurm_args(name, "hydra.launcher.timeout_min=5")]
    driver = start_sweep(tmp_path, *args)
    try:
        wait_for(
            lambda: lock_of(tmp_path, 100000) and lock_of(tmp_path, 100001),
            120,
            "both runs to start",
        )
        driver.send_signal(signal.SIGINT)
        out, err = driver.communicate(timeout=60)
    finally:
        driver.kill()
    assert driver.returncode == 130
    assert "cancelled 2 jobs" in err and "Traceback" not in err
    wait_for(
        lambda: {s.split()[0] for s in slurm_jobs(name).values()} == {"CANCELLED"} or None,
        60,
        "SLURM to cancel the jobs",
    )
    runs = wait_for(
        lambda: len(summaries(tmp_path)) == 2 and summaries(tmp_path),
        30,
        "the runs to record themselves",
    )
    assert {r["status"] for r in runs.values()} == {"interrupted"}
    assert all("SIGTERM" in r["error"] for r in runs.values())


def slurm_queue(name: str) -> dict[str, str]:
    """Job id -> state of the SLURM jobs named ``name`` the controller still has queued or
    running (held jobs, never eligible, never reach ``sacct``)."""
    listed = subprocess.run(
        ["squeue", "-h", "-r", "--name", name, "-o", "%i|%T"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split("|", 1) for line in listed.splitlines() if line)


def test_slurm_a_rerun_after_the_driver_was_killed_leaves_its_queued_jobs_be(slurm, tmp_path):
    """The driver killed (kill -9) while its jobs wait in the queue, the same sweep at
    once: it finds them queued (the markers the driver wrote, checked with squeue), says
    so, and submits nothing (was: submitted every run again). Once those jobs are gone
    (scancel), their markers are ignored and the runs are to run again."""
    name = f"nb{uuid.uuid4().hex[:8]}"
    # held jobs stay pending, on a node the other tests share, at no cost
    args = [
        *TINY,
        "epochs=1,2",
        *slurm_args(name, "hydra.launcher.timeout_min=5"),
        "+hydra.launcher.additional_parameters.hold=true",
    ]
    runs = tmp_path / "results" / "default" / "runs"
    driver = start_sweep(tmp_path, *args, quiet=True)
    try:
        wait_for(lambda: len(list(runs.glob("*/.queued"))) == 2, 120, "the jobs to be queued")
    finally:
        driver.kill()
        driver.wait()
    try:
        queued = slurm_queue(name)
        assert sorted(queued.values()) == ["PENDING", "PENDING"]
        again = sweep(tmp_path, *args, timeout=120)
        assert again.returncode == 0, again.stderr
        assert "2 in progress elsewhere, 0 to run" in again.stderr
        for job_id in queued:
            assert f"SLURM job {job_id} (pending), queued by a sweep on" in again.stderr
        assert "2 running elsewhere" in again.stdout
        assert slurm_queue(name) == queued  # each run submitted once
    finally:
        subprocess.run(["scancel", "--name", name], check=True)
    wait_for(lambda: not slurm_queue(name) or None, 60, "SLURM to cancel the jobs")
    os.chdir(tmp_path)  # the grid's relative out_dir
    try:
        from normbench import sweep as sweeps

        plan = sweeps.plan(args)
        assert len(plan.to_run) == 2 and not plan.elsewhere
    finally:
        os.chdir(REPO)


def test_slurm_a_hung_up_driver_leaves_its_jobs_to_run(slurm, tmp_path):
    """SIGHUP on a SLURM sweep's driver (its login session gone): the jobs go on, as when
    the driver is killed, the driver says so and exits 129; the runs they train and the
    ones still queued are left to them by a rerun."""
    name = f"nb{uuid.uuid4().hex[:8]}"
    args = [*TINY, "epochs=100000", *slurm_args(name, "hydra.launcher.timeout_min=5")]
    driver = start_sweep(tmp_path, *args)
    try:
        owner = wait_for(lambda: lock_of(tmp_path, 100000), 120, "the run to start")
        driver.send_signal(signal.SIGHUP)
        _, err = driver.communicate(timeout=60)
        assert driver.returncode == 129, err
        assert "kill -HUP): the sweep left its 1 SLURM job running" in err
        assert f"({owner['slurm_job']})" in err
        assert slurm_queue(name) == {owner["slurm_job"]: "RUNNING"}
        again = sweep(tmp_path, *args, timeout=120)
        assert again.returncode == 0, again.stderr
        assert "1 in progress elsewhere, 0 to run" in again.stderr
        assert slurm_queue(name) == {owner["slurm_job"]: "RUNNING"}
    finally:
        driver.kill()
        subprocess.run(["scancel", "--name", name], check=True)


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
    again = sweep(tmp_path, *args)
    assert again.returncode == 0, again.stderr
    assert {r["status"] for r in summaries(tmp_path).values()} == {"completed"}


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
