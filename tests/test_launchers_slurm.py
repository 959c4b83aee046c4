"""Sweeps on a real one-node SLURM cluster with accounting (sacct), through the
submitit_slurm launcher.

Checked as a user meets it: a grid completes with its tables; a repeated sweep submits
nothing (``sacct`` shows no new job); a job lost at the launcher's level (``scancel``, a
time limit) leaves its run ``interrupted`` with the reason, the sweep ends with counts and
tables and exit status 1, and the next sweep redoes only that run; each job runs with the
CPUs it was given; a data-parallel run is a task per process; Ctrl-C on the driver cancels
its jobs, a hung-up or killed driver leaves them be.

The cluster is the project's own: brought up by ``tests/cluster/slurm_up.sh`` (or the
script ``NORMBENCH_SLURM_UP`` names) when it is not up, and left up. Where that cannot be
done (not root) the tests skip with the reason, except under CI (``CI`` set), where they
fail. (A file of its own, apart from the other engines': under pytest-xdist's
``--dist loadfile`` the two files run side by side.)
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from launched import REPO, TINY, lock_of, start_sweep, summaries, sweep, unavailable, wait_for

SLURM_UP = Path(os.environ.get("NORMBENCH_SLURM_UP", REPO / "tests" / "cluster" / "slurm_up.sh"))

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
    # 120 epochs: several seconds of training after the lock, for the scancel to find it on
    # a loaded machine (40 epochs, about 2.5 s, once finished first under CI)
    args = [*TINY, "epochs=1,120", *slurm_args(name, "hydra.launcher.timeout_min=5")]
    driver = start_sweep(tmp_path, *args)
    try:
        owner = wait_for(lambda: lock_of(tmp_path, 120), 120, "the 120-epoch run to start")
        subprocess.run(["scancel", owner["slurm_job"]], check=True)
        out, err = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == 1, err
    assert "1 completed" in out and "1 interrupted" in out
    runs = summaries(tmp_path)
    assert runs[1]["status"] == "completed"
    assert runs[120]["status"] == "interrupted"
    assert f"SLURM job {owner['slurm_job']}: cancelled" in runs[120]["error"]
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
    assert "1 interrupted" in done.stdout, (done.stderr, summaries(tmp_path))
    (run,) = summaries(tmp_path).values()
    assert run["status"] == "interrupted" and "time limit" in run["error"]
    os.chdir(tmp_path)  # the grid's relative out_dir
    try:
        from normbench import sweep as sweeps

        assert len(sweeps.plan(args).to_run) == 1
    finally:
        os.chdir(REPO)


def test_slurm_a_job_its_warning_signal_ended_before_its_run_is_lost_to_the_time_limit(
    slurm, tmp_path
):
    """SLURM's time-limit warning (SIGUSR2) may come as the job starts (up to 60 s before
    ``signal_delay_s``). Before submitit's Python has a handler for it, the signal's
    default action ends the task: the job is FAILED, no more, and sacct's exit code of
    the step names the signal. While Hydra sets the job up, submitit's handler raises its
    error outside normbench's. Either way the run's reason says it was the time limit
    (was: "exited with an error (FAILED)"); a job that failed otherwise is not taken for
    one."""
    import submitit

    from normbench import launchers

    jobs, errors = {}, {}
    for kind, command in (("killed", "kill -USR2 $$"), ("failed", "exit 3")):
        jobs[kind] = subprocess.run(
            ["sbatch", "--parsable", "-J", f"nb{uuid.uuid4().hex[:8]}", "-o", os.devnull]
            + ["--wrap", f"srun bash -c '{command}'"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        errors[kind] = RuntimeError("no result")
    executor = submitit.SlurmExecutor(folder=tmp_path / "jobs", max_num_timeout=0)
    executor.update_parameters(time=1, job_name=f"nb{uuid.uuid4().hex[:8]}")
    raised = executor.submit(signal.raise_signal, signal.SIGUSR2)  # submitit's handler raises
    with pytest.raises(Exception) as failure:
        raised.results()
    jobs["raised"], errors["raised"] = raised.job_id, failure.value
    reasons = {}
    for kind, job_id in jobs.items():
        wait_for(lambda j=job_id: _sacct_state(j) == "FAILED", 60, f"job {job_id} to fail")
        handle = submitit.SlurmJob(folder=tmp_path, job_id=job_id)
        reasons[kind] = launchers._lost_reason(handle, errors[kind])
    for kind in ("killed", "raised"):
        reason, specific = reasons[kind]
        assert reason.startswith(f"SLURM time limit or preemption: SLURM job {jobs[kind]} ")
        assert specific, reason
    assert "was ended by SIGUSR2" in reasons["killed"][0]
    assert "timed-out too many times" in reasons["raised"][0]
    failed = f"SLURM job {jobs['failed']}: exited with an error (FAILED)"
    assert reasons["failed"] == (failed, False)


def _sacct_state(job_id: str) -> str:
    listed = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
        capture_output=True,
        text=True,
    ).stdout.split()
    return listed[0] if listed else ""


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
    assert done.stderr.count("Invalid partition name") == 1  # (submitit printed sbatch's too)
    assert not (tmp_path / "results" / "default" / "runs").exists()
    assert not list((tmp_path / "results").rglob("*.pkl"))


def test_slurm_a_gpu_sweep_is_planned_on_a_machine_without_one(slurm, tmp_path):
    """A login node has no GPU, its cluster's nodes do: device=cuda and precision=fp16
    jobs are planned and submitted, each checking its device where it runs. (This cluster's
    node has none either: the job records the one line a run there gives, failed.)"""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nothing here would refuse device=cuda")
    name = f"nb{uuid.uuid4().hex[:8]}"
    cuda = ["device=cuda", "precision=fp16"]
    done = sweep(tmp_path, *TINY, "epochs=1", *cuda, *slurm_args(name))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.splitlines()[-1] == "0 completed, 1 failed", done.stdout
    assert len(slurm_jobs(name)) == 1
    (record,) = summaries(tmp_path).values()
    assert record["status"] == "failed" and record["precision"] == "fp16"
    assert record["error"] == "device=cuda but CUDA is not available here; use device=auto or cpu"
    # (what is still refused before anything is submitted: tests/test_sweep.py's plans)


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


def test_slurm_a_run_started_by_hand_in_a_step_of_two_tasks(slurm, tmp_path):
    """`srun -n 2 normbench run processes=2 ...`: the two tasks are the run's ranks; the
    step ends 0 with rank 0's one line (rank 1 crashed printing a result it does not
    hold: the step and the job failed, and so did the same command again, which skips:
    the same fix, not run again here for its 6 s)."""
    command = [
        "srun", "-n", "2", "--cpus-per-task=1", f"--job-name=nb{uuid.uuid4().hex[:8]}",
        sys.executable, "-m", "normbench.cli", "run", "norm=sync_bn", "processes=2",
        "dataset.train_size=128", "batch_size=32", "epochs=1", "eval.bn_stats=false",
        "eval.precise_bn_images=64",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.count("test acc") == 1, done.stdout
    (record,) = summaries(tmp_path).values()
    assert record["status"] == "completed" and record["world_size"] == 2


def test_slurm_a_task_that_dies_interrupts_the_run_and_the_rerun_resumes_it(slurm, tmp_path):
    """processes=2 on SLURM, the task of rank 1 exits at the first step of epoch 2 (a user
    norm that does it once, tests/test_distributed_runs.py's): rank 0's collective fails,
    it records the run interrupted with the reason (its checkpoint of epoch 1 kept) and
    srun ends the job; the sweep ends with exit 1, and the next one resumes the run from
    its checkpoint, on 2 tasks again, to its end."""
    from test_distributed_runs import ODD, RUN

    code, conf = tmp_path / "code", tmp_path / "conf" / "norm"
    code.mkdir()
    conf.mkdir(parents=True)
    (code / "odd.py").write_text(ODD)
    (conf / "odd.yaml").write_text("name: odd\n_target_: odd.OddSyncBatchNorm\n")
    marker = tmp_path / "odd"
    env = {**os.environ, "ODD_DOES": "die", "ODD_STEP": "5", "ODD_MARKER": str(marker)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))
    name = f"nb{uuid.uuid4().hex[:8]}"
    command = [
        sys.executable, "-m", "normbench.cli", "--config-dir", str(tmp_path / "conf"), "sweep",
        "norm=odd", "processes=2", *[a for a in RUN if not a.startswith("threads=")],
        *slurm_args(name, "hydra.launcher.timeout_min=5"),
    ]  # fmt: skip

    def swept() -> subprocess.CompletedProcess:
        return subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
        )

    first = swept()
    assert first.returncode == 1, first.stderr
    assert "1 interrupted" in first.stdout and marker.exists()
    (folder,) = (tmp_path / "results" / "default" / "runs").iterdir()
    record = json.loads((folder / "summary.json").read_text())
    assert record["status"] == "interrupted"
    assert "another process of the run stopped" in record["error"], record["error"]
    assert (folder / "checkpoint.pt").exists() and not (folder / ".lock").exists()

    again = swept()
    assert again.returncode == 0, again.stderr
    assert "1 completed" in again.stdout
    record = json.loads((folder / "summary.json").read_text())
    assert record["status"] == "completed" and record["resumed_from_epoch"] == 1
    assert (record["world_size"], record["processes"]) == (2, 2)
