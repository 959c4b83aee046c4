"""Handing a sweep's runs to Hydra's launcher, and what happens when a job is lost.

Called by normbench's sweeper (:mod:`hydra_plugins.normbench_sweeper`) with the plan's
runs left to run. A job can die where Python cannot see it: SLURM cancels it
(``scancel``), kills it at its time limit or for memory, loses its node; the OOM
killer ends a joblib worker. Hydra's launchers then raise at the first such job, and
the others run on unattended. Here instead:

- every lost job's run is recorded as ``interrupted``, with the reason (SLURM's state
  for its job, or the launcher's error), so the next sweep redoes it without
  ``--retry-failed``; the sweep waits for the others and ends normally, with counts
  and tables (and exit status 1);
- for submitit's launchers the jobs are submitted as the launcher submits them (same
  executor, same settings, same job function) but collected one by one, and Ctrl-C on
  the driver cancels them (``scancel``), then says which;
- a signal that stops the driver (Ctrl-C, SIGTERM, SIGHUP) is passed on to the processes
  on this machine that it started and that train its runs (joblib workers,
  submitit_local jobs), which record their runs ``interrupted`` and release their
  locks; the driver waits for them a bounded time (:func:`stop_workers`), and after its
  launcher has ended the rest records what they could not (:func:`settle`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from normbench import cores

#: Job states (SLURM's from ``sacct``, submitit_local's) for a job that ended without a
#: result, in words.
JOB_STATES = {
    "CANCELLED": "cancelled",
    "TIMEOUT": "killed at its time limit",
    "NODE_FAIL": "lost: its node failed",
    "OUT_OF_MEMORY": "killed for using too much memory",
    "PREEMPTED": "preempted",
    "BOOT_FAIL": "lost: its node failed to boot",
    "DEADLINE": "stopped at its deadline",
    "FAILED": "exited with an error",
    "INTERRUPTED": "killed by a signal",  # submitit_local
    "FINISHED": "exited without a result",  # submitit_local
    # submitit's word before sacct has reported the job, or after sacct has forgotten it
    "UNKNOWN": "ended, its state not known to sacct",
}
#: States that say no more than that the job's process ended: the run's own record (its
#: signal handler's reason, as for a time limit) stays first.
UNINFORMATIVE_STATES = ("FAILED", "FINISHED", "UNKNOWN")

#: Seconds between the driver's checks of its submitit jobs, and between sacct calls.
POLL_S = 1.0
SACCT_S = 5.0
#: Seconds the driver waits for the runs it stopped to record themselves and release their
#: locks, before its launcher ends their processes (joblib kills its workers outright).
STOP_WAIT_S = 15.0
#: Seconds after the launcher ended for the processes it stopped to go, and for stopped
#: submitit_local jobs to end by themselves before they are cancelled.
SETTLE_WAIT_S = 5.0
LOCAL_END_S = 10.0

#: ``NORMBENCH_RESULT_WAIT_S``: seconds the driver waits for a finished SLURM job's result
#: file to appear before it counts the job as ended without one (submitit's own 15 s, the
#: default: a cluster's shared file system may show a file written on another node late).
#: 0 where the submitit folder is on a disk every node sees at once (a one-node cluster,
#: as the tests'). Local jobs never wait: their result is written on this machine.
RESULT_WAIT_ENV = "NORMBENCH_RESULT_WAIT_S"


#: Hydra's launchers whose jobs run on other machines (a cluster's nodes), by the end of
#: their ``_target_``: a sweep planned here leaves its jobs' devices to be checked there
#: (:class:`normbench.validation.jobs_elsewhere`). Ray's own launcher is one only where
#: its ``ray.init.address`` names another machine (:func:`runs_elsewhere`).
ELSEWHERE = ("SlurmLauncher", "RayAWSLauncher")

#: Ray addresses of this machine: its local cluster (None: ray.init starts one), or a
#: cluster found here ("auto", which may be this machine alone).
_HERE = (None, "", "auto", "local", "localhost", "127.0.0.1")


def runs_elsewhere(launcher: Any) -> bool:
    """Whether the jobs of ``launcher`` (a composed ``hydra.launcher``) run on other
    machines than the one that plans them: SLURM's, Ray on AWS, and Ray's launcher with
    the address of another machine's cluster (``ray://host:port`` or ``host:port``)."""
    if launcher is None:
        return False
    target = str(launcher.get("_target_", ""))
    if target.endswith(ELSEWHERE):
        return True
    if not target.endswith("RayLauncher"):
        return False
    ray = launcher.get("ray") or {}
    address = (ray.get("init") or {}).get("address")
    host = str(address).removeprefix("ray://").rsplit(":", 1)[0] if address else address
    return host not in _HERE


def result_wait_s() -> float | None:
    """:data:`RESULT_WAIT_ENV`'s seconds (None: unset, submitit's own); a UserError for a
    value that is not a number of seconds, 0 or more."""
    import math

    from normbench.errors import UserError

    value = os.environ.get(RESULT_WAIT_ENV)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not math.isfinite(seconds) or seconds < 0:
        raise UserError(f"{RESULT_WAIT_ENV}={value!r}: expected a number of seconds, 0 or more")
    return seconds


#: Seconds to wait before each new try of a refused submission (a busy controller times
#: out; one array is one ``sbatch``, so a refused one submitted nothing).
SUBMIT_RETRY_S = (2.0, 10.0)

#: The plan :func:`normbench.sweep.launch` hands to Hydra (a ``sweep.Plan``), for
#: normbench's sweeper to read in the same process: set here, so that this module needs
#: nothing of the sweep's.
launching: Any = None


def launch_planned(sweeper) -> list[Any]:
    """The sweeper's ``sweep``: launch the planned runs with its launcher; never raises for
    a lost job (only for Ctrl-C or SIGTERM on the driver, after cancelling its jobs)."""
    from omegaconf import OmegaConf

    plan = launching
    assert plan is not None, "normbench's sweeper runs only inside normbench.sweep.launch"
    jobs = plan.to_run
    sweep_dir = Path(str(sweeper.config.hydra.sweep.dir))
    new_dir = not sweep_dir.exists()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(sweeper.config, sweep_dir / "multirun.yaml")

    overrides = [job.overrides for job in jobs]
    # How many jobs there are to share the cores (normbench.cores): workers and local
    # jobs started from here inherit it.
    saved = os.environ.get(cores.CONCURRENT_ENV)
    os.environ[cores.CONCURRENT_ENV] = str(len(jobs))
    try:
        if type(sweeper.launcher).__module__.startswith("hydra_plugins.hydra_submitit_launcher"):
            returns = _launch_submitit(sweeper.launcher, jobs, plan)
        else:
            returns = list(sweeper.launcher.launch(overrides, initial_job_idx=0))
            _record_failed_returns(zip(jobs, returns, strict=False))
        return returns
    except SubmissionRefused as err:  # nothing was started: the user's to fix
        plan.launcher_error, plan.refused = str(err), True
        if new_dir:  # the job files of jobs that never were: nothing half-written stays
            shutil.rmtree(sweep_dir, ignore_errors=True)
        return []
    except Exception as err:  # a worker killed (joblib), a task lost (Ray)
        plan.launcher_error = f"{type(err).__name__}: {_first_line(err)}"
        _record_lost(jobs, f"lost by the launcher: {plan.launcher_error}")
        return []
    finally:
        if saved is None:
            os.environ.pop(cores.CONCURRENT_ENV, None)
        else:
            os.environ[cores.CONCURRENT_ENV] = saved


def _record_failed_returns(pairs) -> None:
    """Jobs whose Hydra job returned failed without their run recording it: an exception
    before normbench's task function ran or could catch it (a SLURM time-limit signal in
    the job's first second, while Hydra sets the job up). Their runs are recorded
    interrupted (a time limit, a signal) or failed, with the reason, if nothing is yet."""
    from hydra.core.utils import JobStatus

    from normbench import interrupts
    from normbench.runner import record_unfinished

    for job, ret in pairs:
        if getattr(ret, "status", None) is not JobStatus.FAILED:
            continue
        # The stored exception itself: JobReturn.return_value would log it once more and raise.
        err = getattr(ret, "_return_value", None)
        if not isinstance(err, BaseException):
            continue
        why = interrupts.reason(err)
        status = "interrupted" if why else "failed"
        record_unfinished(job.cfg, status, why or f"{type(err).__name__}: {_first_line(err)}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def _record_lost(
    jobs: Sequence, reason: str, slurm_job: str | None = None, keep_own: bool = False
) -> None:
    """Record the jobs' runs as interrupted; a SLURM job that ended without a result is
    recorded even if it never started its run (cancelled while queued)."""
    from normbench.errors import NotWritten
    from normbench.runner import record_lost

    for job in jobs:
        try:
            record_lost(
                job.cfg,
                reason,
                slurm_job=slurm_job,
                unstarted=slurm_job is not None,
                keep_own=keep_own,
            )
        except NotWritten:  # a full disk: the run stays without a summary, as not run
            continue


def _executor(launcher):
    """The submitit executor exactly as the launcher builds it (its ``launch``)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    params = launcher.params
    kind = launcher._EXECUTOR
    specific_init_keys = {"max_num_timeout"}
    init_params = {"folder": params["submitit_folder"]}
    init_params.update({f"{kind}_{k}": v for k, v in params.items() if k in specific_init_keys})
    executor = submitit.AutoExecutor(cluster=kind, **init_params)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    init_keys = specific_init_keys | {"submitit_folder"}
    executor.update_parameters(
        **{k if k in base else f"{kind}_{k}": v for k, v in params.items() if k not in init_keys}
    )
    return executor


def _launch_submitit(launcher, jobs: Sequence, plan) -> list[Any]:
    from hydra.core.singleton import Singleton

    from normbench import interrupts, queued

    executor = _executor(launcher)
    slurm = launcher._EXECUTOR == "slurm"  # local jobs are polled, not looked up
    if slurm:
        _one_task_per_process(executor, jobs)
    Path(str(launcher.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    state = Singleton.get_state()
    arguments = [
        (list(job.overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", state)
        for idx, job in enumerate(jobs)
    ]
    wait = result_wait_s() if slurm else 0.0  # (checked before anything is submitted)
    submitted = _submit(executor, launcher, arguments)
    if wait is not None:
        # submitit waits 15 s for a finished job's result file to appear (a cluster's
        # shared file system may show it late). A local job writes it before its process
        # ends, on this machine's disk: a killed one's absence is known at once.
        for handle in submitted:
            handle._results_timeout_s = wait
    pending = dict(zip(submitted, jobs, strict=True))
    if slurm:  # a rerun while they wait (this driver killed) leaves them to their jobs
        for handle, job in pending.items():
            queued.write(job.run_dir, handle.job_id, launcher.params.get("name", ""))
    returns: list[Any] = []
    last_sacct = time.monotonic()
    try:
        while pending:
            if slurm and time.monotonic() - last_sacct > SACCT_S:
                submitted[0].watcher.update()  # one sacct call for every job
                last_sacct = time.monotonic()
            for handle in [h for h in pending if h.done()]:
                job = pending.pop(handle)
                try:
                    returns.append(_result(handle))
                    _record_failed_returns([(job, returns[-1])])
                except Exception as err:  # the job ended without a result
                    reason, specific = _lost_reason(handle, err)
                    _record_lost([job], reason, slurm_job=handle.job_id, keep_own=not specific)
                queued.remove(job.run_dir, handle.job_id)
            if pending:
                time.sleep(POLL_S)
    except BaseException as stop:
        if slurm and isinstance(stop, interrupts.Interrupted) and stop.signum == signal.SIGHUP:
            # The login session is gone: cluster jobs go on (their markers stay, so that
            # the same sweep later leaves them be), as when this process is killed.
            plan.left_running = [str(handle.job_id) for handle in pending]
        else:  # Ctrl-C or SIGTERM on the driver: its jobs go with it
            plan.cancelled = _cancel(pending)
            for handle, job in pending.items():
                queued.remove(job.run_dir, handle.job_id)
        raise
    return returns


#: srun's setting for a data-parallel run's tasks: a task that exits with an error ends
#: the others (its peers' collectives would otherwise wait out the process group's
#: timeout, and a hung one the job's time limit).
SRUN_ARGS = ["--kill-on-bad-exit=1"]


def _one_task_per_process(executor, jobs: Sequence) -> None:
    """A sweep of data-parallel runs on SLURM: each job ``processes`` tasks on each of its
    ``nodes`` nodes, a task per rank (the plan checked that every job asks for the same,
    and that the user's launcher settings do not say otherwise)."""
    flat = jobs[0].flat
    processes, nodes = int(flat["processes"]), int(flat["nodes"])
    if processes * nodes > 1:
        executor.update_parameters(tasks_per_node=processes, nodes=nodes, slurm_srun_args=SRUN_ARGS)


def _result(handle) -> Any:
    """What the job's Hydra job returned: rank 0's task's, for a job of several tasks (the
    task that ran the run's record; the others return nothing of it)."""
    if handle.num_tasks > 1:
        return handle.task(0).results()[0]
    return handle.results()[0]


#: Words of a submission refused for a passing reason (a busy or restarting controller);
#: any other refusal (a wrong partition, more CPUs than a node has) is the user's to fix.
TRANSIENT = ("timed out", "temporarily", "try again", "unable to contact", "connection")


class SubmissionRefused(Exception):
    """The scheduler refused the sweep's jobs for a reason the user must fix."""


def _submit(executor, launcher, arguments) -> list:
    """Submit the jobs as one array. A submission refused for a passing reason is tried
    again, then raises; one refused for any other reason raises SubmissionRefused with
    the scheduler's words. (A submission that reached the controller though reported
    failed would start a run twice: the run's lock lets one job train and the other
    skip.)"""
    import io

    for wait in (*SUBMIT_RETRY_S, None):
        try:
            # submitit prints sbatch's error lines before it raises them: said once, below
            with contextlib.redirect_stderr(io.StringIO()):
                return executor.map_array(launcher, *zip(*arguments, strict=True))
        except Exception as err:
            text = str(err).lower()
            if not any(word in text for word in TRANSIENT):
                raise SubmissionRefused(_scheduler_words(err)) from err
            if wait is None:
                raise
            from normbench.terminal import clean

            why = clean(_scheduler_words(err))  # the scheduler's words, shown as text
            print(
                f"sweep: submission refused ({why}); trying again in {wait:.0f} s",
                file=sys.stderr,
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


def _scheduler_words(err: BaseException) -> str:
    """The scheduler's reason from a failed submission: sbatch's last error line."""
    lines = [line.strip() for line in str(err).splitlines() if "error" in line.lower()]
    return lines[-1] if lines else f"{type(err).__name__}: {_first_line(err)}"


def _lost_reason(handle, err: BaseException) -> tuple[str, bool]:
    """Why a job ended without a result, in words, and whether the scheduler's state says
    more than the run's own record would (UNINFORMATIVE_STATES do not: the process
    exited, and the run, if it could, wrote why; UNKNOWN, seen when the job ended between
    two sacct calls, had replaced a time limit's own reason)."""
    state = str(getattr(handle, "state", "") or "").split()
    name = state[0].upper() if state else ""
    slurm = "Slurm" in type(handle).__name__
    job = f"{'SLURM ' if slurm else ''}job {handle.job_id}"
    if slurm and name in UNINFORMATIVE_STATES:
        early = _time_limit_before_the_run(handle, err)
        if early is not None:
            return f"SLURM time limit or preemption: {job} {early} ({' '.join(state)})", True
    if name:
        word = JOB_STATES.get(name, name.lower())
        return f"{job}: {word} ({' '.join(state)})", name not in UNINFORMATIVE_STATES
    return f"{job} ended without a result: {type(err).__name__}: {_first_line(err)}", False


#: How submitit's job traceback names the error its time-limit handler raises (no requeue
#: left), as the driver receives it in the job's failure.
UNCOMPLETED = "submitit.core.utils.UncompletedJobError: "


def _time_limit_before_the_run(handle, err: BaseException) -> str | None:
    """How SLURM's time-limit warning ended a job before its run could record it, in a
    few words; None when it did not. It may come as the job starts (up to 60 s before
    ``signal_delay_s``): before submitit's Python has a handler, its default action ends
    the task (sacct's exit code names the signal); while Hydra sets the job up, submitit's
    handler raises outside normbench's, and the job's traceback says so."""
    from normbench import interrupts

    for line in reversed(str(err).splitlines()):
        if line.startswith(UNCOMPLETED):
            return f"was stopped by submitit before its run began: {line[len(UNCOMPLETED) :]}"
    warning = interrupts.submitit_signal()
    if warning in _step_signals(str(handle.job_id)):
        return (
            f"was ended by {signal.Signals(warning).name}, SLURM's warning of its time "
            "limit, before it could handle it"
        )
    return None


def _step_signals(job_id: str) -> set[int]:
    """The signals that ended SLURM job ``job_id``'s steps (sacct's ``ExitCode``,
    ``code:signal``), as far as sacct tells: none where it cannot be asked."""
    import subprocess

    try:
        listed = subprocess.run(
            ["sacct", "-n", "-P", "-j", job_id, "-o", "ExitCode"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    signals = set()
    for line in listed.split():
        _, _, number = line.partition(":")
        if number.isdigit() and int(number):
            signals.add(int(number))
    return signals


def _local_running(handle) -> bool:
    try:  # submitit's LocalJob polls its process (done() waits for a result file)
        return handle.get_info().get("jobState") == "RUNNING"
    except Exception:
        return False


def _cancel(pending: dict) -> list[str]:
    """Cancel the jobs still pending or running (scancel on SLURM, SIGINT for local
    jobs, whose runs record themselves as interrupted); the ids cancelled. Local jobs
    whose runs have recorded themselves already (the driver's stop signal reached them,
    :func:`stop_workers`) are given time to end by themselves first: submitit's local
    controller, cancelled, prints a traceback."""
    from normbench.rundir import read_summary

    ending = [
        handle
        for handle, job in pending.items()
        if "Slurm" not in type(handle).__name__ and read_summary(job.run_dir) is not None
    ]
    deadline = time.monotonic() + LOCAL_END_S
    while time.monotonic() < deadline and any(_local_running(handle) for handle in ending):
        time.sleep(0.05)
    ids = []
    for handle in pending:
        try:
            handle.cancel(check=False)
        except Exception:  # a job that ended meanwhile, a missing scancel: keep going
            continue
        ids.append(str(handle.job_id))
    return ids


def _workers(jobs: Sequence) -> dict[Any, Any]:
    """The jobs whose runs are owned by a live process on this machine that descends from
    this one (a joblib worker, a submitit_local job; never a cluster job), with the owner."""
    from normbench.interrupts import descends_from
    from normbench.lock import read_owner

    me = os.getpid()
    owners = {}
    for job in jobs:
        owner = read_owner(job.run_dir)
        if owner is None or not (owner.local and owner.alive) or owner.pid == me:
            continue
        if descends_from(owner.pid, me):
            owners[job.run_dir] = owner
    return owners


def _wait_released(owners: dict[Any, Any], seconds: float) -> dict[Any, Any]:
    """Wait until each run's lock is no longer held by the owner found (released, or its
    process gone), at most ``seconds``; the owners that still hold theirs."""
    from normbench.lock import read_owner

    deadline = time.monotonic() + seconds
    while owners:
        for folder, owner in list(owners.items()):
            now = read_owner(folder)
            if now is None or now.token != owner.token or not now.alive:
                del owners[folder]
        if not owners or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return owners


def stop_workers(plan):
    """The driver's action on a stop signal (:func:`normbench.interrupts.handle_signals`):
    send the signal on to the processes training the plan's runs that this driver started
    (Ctrl-C in a terminal reaches them already: a second one is ignored), and wait until
    they have recorded their runs and released their locks, at most ``STOP_WAIT_S``."""

    def stop(signum: int) -> None:
        owners = _workers(plan.to_run)
        for owner in owners.values():
            try:
                os.kill(owner.pid, signum)
            except ProcessLookupError:  # gone meanwhile: settle records its run
                continue
        _wait_released(owners, STOP_WAIT_S)

    return stop


def settle(plan, reason: str) -> None:
    """After a stopped sweep's launcher has ended: each run of the plan still locked by a
    process that is gone (a worker killed before it could record itself) is recorded
    ``interrupted`` with ``reason``, unless it recorded a result, and its lock removed.
    Runs owned by live processes elsewhere (cluster jobs, which their cancel stops) are
    left to record themselves."""
    from normbench.errors import NotWritten
    from normbench.lock import break_lock, read_owner
    from normbench.runner import record_unfinished

    _wait_released(_workers(plan.to_run), SETTLE_WAIT_S)
    for job in plan.to_run:
        owner = read_owner(job.run_dir)
        if owner is None or owner.alive:
            continue
        # It takes the stale lock over; a full disk leaves the run without a summary, as not run.
        with contextlib.suppress(NotWritten):
            record_unfinished(job.cfg, "interrupted", reason)
        owner = read_owner(job.run_dir)
        if owner is not None and not owner.alive:  # the run had recorded itself
            break_lock(job.run_dir, owner.token)
