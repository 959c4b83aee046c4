"""Sweeps: a grid of runs through Hydra's multirun, so its launcher plugins apply unchanged.

:func:`plan` expands the grid exactly as Hydra's basic sweeper will (the command
line's sweeps plus an experiment preset's ``hydra.sweeper.params``), finds which runs
are done already (or owned by a live process elsewhere), and checks every job left to
run before anything trains: each config composes and validates, and each distinct
(data set, model, norm, batch size, ...) builds and survives one training-mode forward
pass. One bad value anywhere fails the whole sweep with one message. Planning a
complete sweep costs about a millisecond per run: a job's values are read without
composing it (:func:`normbench.config.compose_plain`: the jobs share Hydra's
compositions), and a done run is one small JSON read.

:func:`launch` then hands only the runs left to Hydra (``--multirun``, with normbench's
sweeper, :mod:`hydra_plugins.normbench_sweeper`, in place of the basic one): the basic
launcher runs them one after another in this process, ``hydra/launcher=joblib`` in
parallel worker processes, ``hydra/launcher=submitit_slurm`` as SLURM jobs, the ray
launcher as Ray tasks. Every job is :func:`run_job`: one :func:`normbench.runner.run`.
:mod:`normbench.launchers` deals with jobs that die at the launcher's level.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from normbench.errors import UserError

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from normbench.train import Callbacks

#: Set by the sweep command for its jobs (environment, so joblib and SLURM workers see it).
RETRY_ENV = "NORMBENCH_RETRY_FAILED"

#: The driver's pid, for jobs in worker processes that must not outlive it (joblib's).
DRIVER_ENV = "NORMBENCH_SWEEP_DRIVER"

#: Keys that name paths: made absolute before any launcher changes directory.
PATH_KEYS = ("out_dir", "dataset.root")


@dataclass
class Job:
    overrides: list[str]  # as the grid gives them (and the launcher gets them)
    # the config as planned: compose's, or compose_plain's plain containers, which
    # ``cfg`` composes from the grid's overrides when first asked for
    planned: Any
    run_id: str
    run_dir: Path
    previous: str | None  # status already on disk, or None
    # the live owner (lock.Owner) when another process has the run, or its SLURM job still
    # queued from an earlier sweep (queued.Queued)
    busy: Any = None
    flat: dict[str, Any] = field(default_factory=dict)  # the config, flattened (config.flatten)
    grid: list[str] = field(default_factory=list)  # the grid's overrides, as planned
    # its launcher runs it on another machine (validation.jobs_elsewhere)
    elsewhere: bool = False

    @property
    def cfg(self):
        """The job's config, :func:`normbench.config.compose`'s (OmegaConf): a run that
        is done needs only its values, so a plan composes it for the runs it checks and
        launches, and for whoever asks."""
        from normbench.config import Plain, compose
        from normbench.validation import jobs_elsewhere

        if isinstance(self.planned, Plain):
            with jobs_elsewhere(self.elsewhere):
                self.planned = compose(self.grid)
        return self.planned


@dataclass
class Plan:
    """The grid, checked: one :class:`Job` per run, in Hydra's order."""

    overrides: list[str]
    jobs: list[Job] = field(default_factory=list)
    retry_failed: bool = False
    #: Cluster jobs cancelled because the sweep was stopped (their ids), set by launchers.
    cancelled: list[str] = field(default_factory=list)
    #: Cluster jobs left to go on because the sweep's terminal hung up (their ids).
    left_running: list[str] = field(default_factory=list)
    #: Why the launcher itself failed (a submission refused, a worker killed), if it did:
    #: runs it never started stay "not run", and the sweep says why.
    launcher_error: str | None = None
    #: The scheduler refused every job (a wrong partition): nothing was started.
    refused: bool = False
    #: Grid points dropped as the same run as an earlier one (``lr=0.1,0.10``, or points
    #: that differ only in execution keys such as ``threads``).
    duplicates: int = 0

    def skipped(self, job: Job) -> bool:
        from normbench.runner import is_done

        return is_done({"status": job.previous} if job.previous else None, self.retry_failed)

    @property
    def to_run(self) -> list[Job]:
        return [job for job in self.jobs if not self.skipped(job) and job.busy is None]

    @property
    def elsewhere(self) -> list[Job]:
        """Runs owned by live processes elsewhere when planned, or queued in a SLURM job of
        an earlier sweep: not launched again."""
        return [job for job in self.jobs if not self.skipped(job) and job.busy is not None]

    @property
    def experiment_dirs(self) -> list[Path]:
        return sorted({job.run_dir.parent.parent for job in self.jobs})

    def outcome(self) -> Counter:
        """How the jobs ended: ``skipped`` (done before), ``completed``, ``diverged``,
        ``failed``, ``interrupted`` (stopped from outside: redone by the next sweep),
        ``running elsewhere`` (owned by another process, no result yet) and ``not run``
        (no summary: a job never started)."""
        from normbench.rundir import read_summary, status_of

        counts: Counter = Counter()
        for job in self.jobs:
            if self.skipped(job):
                counts["skipped"] += 1
                continue
            summary = read_summary(job.run_dir)
            if summary:
                counts[status_of(summary) or "not run"] += 1
            else:
                counts["running elsewhere" if job.busy is not None else "not run"] += 1
        return counts


def _sweeper_params(cfg) -> list[str]:
    """An experiment preset's ``hydra.sweeper.params`` (of ``cfg``, :func:`_hydra_config`'s),
    as ``key=values`` overrides."""
    _check_launcher(cfg.hydra.launcher)
    params = cfg.hydra.sweeper.get("params") or {}
    return [f"{key}={value}" for key, value in params.items()]


def _check_launcher(launcher) -> None:
    """Launcher settings that would stop every job before it trains."""
    if "n_jobs" in launcher:
        n_jobs = launcher.n_jobs
        if not isinstance(n_jobs, int) or isinstance(n_jobs, bool) or n_jobs == 0:
            raise UserError(
                "hydra.launcher.n_jobs must be a non-zero integer (jobs at once; -1: one per "
                f"core), got {n_jobs!r}"
            )
    if "signal_delay_s" in launcher and "timeout_min" in launcher:
        delay, limit = launcher.signal_delay_s, launcher.timeout_min
        if isinstance(delay, int) and isinstance(limit, int | float) and delay >= limit * 60:
            raise UserError(
                f"hydra.launcher.signal_delay_s={delay} is not below the time limit "
                f"(hydra.launcher.timeout_min={limit} minutes): SLURM would send every job "
                "its time-limit signal as it starts; make the delay a fraction of the limit "
                "(SLURM may send it up to 60 s early)"
            )


class _Tasks:
    """A sweep's processes and nodes against its launcher, job by job as the plan composes
    them (one line each, before anything is submitted). On SLURM each job is one task per
    process (the launcher is given ``tasks_per_node=processes``, ``nodes=nodes``:
    :mod:`normbench.launchers`), so every job of the sweep must ask for the same, and a
    ``hydra.launcher.tasks_per_node`` or ``nodes`` the user set otherwise is refused;
    elsewhere a run on several nodes is (:func:`normbench.distributed.check_nodes`). The
    launcher's config is composed only for a sweep that has data-parallel jobs or sets
    these keys."""

    KEYS = ("tasks_per_node", "nodes")

    def __init__(self, overrides: Sequence[str]) -> None:
        self.first: tuple[int, int] | None = None
        self.launcher: Any = None
        self.explicit = {
            key
            for key in self.KEYS
            for o in overrides
            if o.split("=", 1)[0].lstrip("+~") == f"hydra.launcher.{key}"
        }

    def check(self, flat: dict[str, Any], job_overrides: Sequence[str]) -> None:
        from normbench.distributed import check_nodes

        shape = (int(flat["processes"]), int(flat["nodes"]))
        self.first = self.first or shape
        if shape == self.first == (1, 1) and not self.explicit:
            return
        if self.launcher is None:
            self.launcher = _hydra_config(job_overrides).hydra.launcher
        if not str(self.launcher.get("_target_", "")).endswith("SlurmLauncher"):
            check_nodes(shape[1], slurm=False)
            return
        if shape != self.first:
            raise UserError(
                f"processes={self.first[0]} nodes={self.first[1]} and processes={shape[0]} "
                f"nodes={shape[1]} in one SLURM sweep: each job is one task per process, and "
                "every job of a sweep must ask for the same; sweep them separately"
            )
        for key, want in zip(self.KEYS, shape, strict=True):
            have = self.launcher.get(key)
            if have != want and (have != 1 or key in self.explicit):
                raise UserError(
                    f"hydra.launcher.{key}={have} conflicts with processes={shape[0]} "
                    f"nodes={shape[1]}: a data-parallel run on SLURM is one task per process, "
                    f"and normbench sets tasks_per_node=processes and nodes=nodes; leave "
                    f"hydra.launcher.{key} out"
                )


def _hydra_config(overrides: Sequence[str]):
    """The config with Hydra's own (``hydra.launcher``, ``hydra.sweeper``) for ``overrides``."""
    from hydra import compose, initialize_config_dir

    from normbench.options import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def expand(overrides: Sequence[str]) -> list[list[str]]:
    """The jobs' overrides, in the order and with the precedence of Hydra's basic sweeper."""
    return _expand(overrides)[0]


def _expand(overrides: Sequence[str]) -> tuple[list[list[str]], bool]:
    """:func:`expand`'s jobs, and whether the sweep's launcher runs them on other machines
    (:func:`normbench.launchers.runs_elsewhere`: their devices are checked there)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from normbench.config import (
        _composition_message,
        check_group_overrides,
        compose,
        expand_globs,
    )
    from normbench.launchers import runs_elsewhere
    from normbench.validation import jobs_elsewhere

    overrides = expand_globs(overrides)
    _check_swept_options_keys(check_group_overrides(overrides))
    parser = OverridesParser.create()
    try:
        first = BasicSweeper.split_arguments(parser.parse_overrides(list(overrides)), None)[0][0]
    except HydraException as err:
        raise UserError(f"invalid sweep: {str(err).splitlines()[0]}") from None
    # Hydra's own config (the launcher, the sweeper's params), once; where it cannot be
    # composed (Hydra's error, or OmegaConf's on a sweeper's null params), normbench's
    # composition below says why in the user's words, else its own error is told
    try:
        hydra_cfg, failed = _hydra_config(first), None
    except Exception as err:
        hydra_cfg, failed = None, err
    elsewhere = hydra_cfg is not None and runs_elsewhere(hydra_cfg.hydra.launcher)
    with jobs_elsewhere(elsewhere):
        compose(first)  # a bad key or value in the plain config says so here, clearly
    if isinstance(failed, HydraException):
        raise UserError(_composition_message(failed, overrides)) from None
    if failed is not None:
        raise failed
    params = expand_globs(_sweeper_params(hydra_cfg))
    try:
        batches = BasicSweeper.split_arguments(parser.parse_overrides([*params, *overrides]), None)
    except HydraException as err:
        raise UserError(f"invalid sweep: {str(err).splitlines()[0]}") from None
    return [list(job) for job in batches[0]], elsewhere


def _check_swept_options_keys(parsed: Sequence[Any]) -> None:
    """A key set for a group the sweep sweeps (``norm=layer,custom_bn norm.momentum=0.1``)
    that some of its options have and others lack: one message saying which, before any
    job is composed. Every job gets the same settings, so no override sets it in some
    jobs only."""
    from normbench.config import GROUPS, option_file
    from normbench.validation import option_keys

    swept = {
        o.key_or_group: list(o.sweep_string_iterator())
        for o in parsed
        if o.key_or_group in GROUPS and o.is_sweep_override()
    }
    for override in parsed:
        group, _, rest = override.key_or_group.partition(".")
        if group not in swept or not rest or override.is_delete() or override.package:
            continue
        # options with a YAML of their own: an installed package's is not imported to see
        options = [o for o in swept[group] if option_file(group, o) is not None]
        having = [o for o in options if _has_key(option_keys(group, o), rest)]
        lacking = [o for o in options if o not in having]
        if having and lacking:
            verb = "has" if len(lacking) == 1 else "have"
            raise UserError(
                f"{override.input_line}: {group}={','.join(lacking)} of this sweep {verb} no "
                f"{rest} ({','.join(having)} {'has' if len(having) == 1 else 'have'} it); "
                "every job of a sweep gets the same settings: sweep "
                f"{group}={','.join(having)} {override.input_line.lstrip('+')} on its own"
            )


def _has_key(flat: dict[str, Any], key: str) -> bool:
    return key in flat or any(k.startswith(f"{key}.") for k in flat)


def absolute_paths(overrides: Sequence[str], cfg) -> list[str]:
    """``overrides`` with the config's relative paths (``PATH_KEYS``) made absolute from
    this directory, so that a launcher that changes directory (``hydra.job.chdir``, a
    cluster job starting elsewhere) finds the same folders."""
    from hydra.core.override_parser.types import Quote, QuotedString
    from omegaconf import OmegaConf

    result = list(overrides)
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if not isinstance(value, str) or os.path.isabs(value):
            continue
        text = QuotedString(text=os.path.abspath(value), quote=Quote.single).with_quotes()
        setting = f"{key}={text}"
        at = [i for i, o in enumerate(result) if o.split("=", 1)[0].lstrip("+") == key]
        if at:
            result[at[-1]] = setting
        else:
            result.append(setting)
    return result


def _task_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides of a job's own config: Hydra's (``hydra.*``, ``hydra/...``) go to
    the sweep's config once, as Hydra's multirun hands them, not to every job."""
    from normbench.config import parse_overrides

    parsed = parse_overrides(overrides)
    return [
        text
        for text, override in zip(overrides, parsed, strict=True)
        if not override.key_or_group.startswith("hydra")
    ]


def plan(overrides: Sequence[str], retry_failed: bool = False) -> Plan:
    """Expand and check the whole grid; raise :class:`UserError` on the first bad job.

    Runs already done, and runs owned by a live process elsewhere, are found here and are
    not checked further: only the runs left to run build their models. Grid points that
    are the same run as an earlier one (same run folder) are dropped (``duplicates``).
    ``glob(...)`` over a group's options is expanded as Hydra's basic sweeper does, and the
    report's ``baseline`` and ``select`` are checked against the grid."""
    from normbench.build import prepare
    from normbench.config import (
        EXECUTION_KEYS,
        compose_plain,
        expand_globs,
        flatten,
        with_searchpath,
    )
    from normbench.lock import read_owner
    from normbench.queued import QueueCheck
    from normbench.rundir import check_writable, read_summary, status_of
    from normbench.runner import check_run_folder, experiment_dir, run_id
    from normbench.validation import jobs_elsewhere

    # the user's config folders, for Hydra too; globs written out, as the plan has them
    overrides = with_searchpath(expand_globs(overrides))
    result = Plan(list(overrides), retry_failed=retry_failed)
    queue = QueueCheck()  # SLURM jobs of an earlier sweep still queued for their runs
    checked: set[str] = set()
    writable: set[Path] = set()
    planned: set[Path] = set()
    tasks = _Tasks(overrides)
    # jobs a cluster runs: their devices are checked there, not on this (login) machine
    grid, elsewhere = _expand(overrides)
    for job_overrides in grid:
        try:
            with jobs_elsewhere(elsewhere):
                planned_cfg = compose_plain(job_overrides)  # compose's values, no OmegaConf copy
        except UserError as err:
            raise UserError(f"in sweep job {' '.join(job_overrides)}: {err}") from None
        flat = flatten(planned_cfg)
        tasks.check(flat, job_overrides)
        rid = run_id(planned_cfg, flat)
        folder = experiment_dir(planned_cfg) / "runs" / rid
        if folder in planned:
            result.duplicates += 1
            continue
        planned.add(folder)
        previous = status_of(read_summary(folder))
        job = Job(job_overrides, planned_cfg, rid, folder, previous, flat=flat, grid=job_overrides,
                  elsewhere=elsewhere)  # fmt: skip
        result.jobs.append(job)
        if result.skipped(job):
            continue
        owner = read_owner(folder)
        if owner is not None and owner.alive:
            job.busy = owner
            continue
        job.busy = queue.find(folder)
        if job.busy is not None:
            continue
        cfg = job.cfg
        job.overrides = absolute_paths(_task_overrides(job_overrides), cfg)
        check_run_folder(folder)  # a link, or a folder in a file's place: before anything runs
        if folder.parent.parent not in writable:  # once per experiment folder
            check_writable(folder.parent.parent)
            writable.add(folder.parent.parent)
        try:
            there = folder.exists()
        except OSError:  # a runs/ folder that cannot be looked into: its writes say so
            there = True
        if there:  # a run folder left read-only, or a file in its place
            check_writable(folder)
        # Seeds, learning rates and where results go do not change whether a job can run.
        shape = {k: v for k, v in flat.items() if k not in {"seed", "lr", *EXECUTION_KEYS}}
        key = json.dumps(shape, sort_keys=True, default=str)
        if key in checked:
            continue
        checked.add(key)
        try:
            # loads each data set once (runner's cache), builds, probes (on the CPU here for
            # a job that runs on a GPU elsewhere)
            if elsewhere and cfg.device != "cpu":
                prepare(_on_the_cpu(cfg), device="cpu")
            else:
                prepare(cfg)
        except UserError as err:
            raise UserError(f"in sweep job {' '.join(job_overrides)}: {err}") from None
    _check_report(result.jobs)
    return result


def _on_the_cpu(cfg):
    """``cfg`` as the plan probes a job that runs on a GPU elsewhere, on this machine's
    CPU: a CUDA-only kernel (``norm.backend=triton``) as ``auto``, the CPU's kernel, which
    computes the same (the probe asks whether the model can train at its batch, not how
    fast)."""
    import copy

    from omegaconf import OmegaConf, open_dict

    if cfg.norm.get("backend") != "triton":
        return cfg
    probe = copy.deepcopy(cfg)
    OmegaConf.set_readonly(probe, False)
    with open_dict(probe):
        probe.norm.backend = "auto"
    return probe


def _check_report(jobs: Sequence[Job]) -> None:
    """The tables a sweep prints at its end can be made: each experiment's
    ``report.baseline`` is one of its norms and each ``report.select`` key one it sweeps
    (with a validation split to choose on), among the grid's runs and those already in
    its folder, as the report will read them: a :class:`UserError` before anything runs,
    not after every run trained."""
    from normbench.analysis.collect import frame_of
    from normbench.analysis.keys import resolve_key, swept_keys
    from normbench.rundir import read_summary, split_summary

    experiments: dict[Path, list[Job]] = {}
    for job in jobs:
        experiments.setdefault(job.run_dir.parent.parent, []).append(job)
    for folder, members in experiments.items():
        report = members[0].planned.report  # compose_plain's or compose's: both read alike
        if report.baseline is None and not report.select:
            continue
        configs = {job.run_id: job.flat for job in members}
        try:
            found = sorted((folder / "runs").iterdir())
        except OSError:  # none yet; or one that cannot be read: the plan's own jobs only
            found = []
        for path in found:
            if path.name not in configs:
                config = split_summary(read_summary(path) or {})[1]
                if config:
                    configs[path.name] = config
        norms = sorted({str(c.get("norm.name")) for c in configs.values()})
        if report.baseline is not None and report.baseline not in norms:
            raise UserError(
                f"report.baseline={report.baseline} is not among the norms of the sweep "
                f"or of the runs in {folder} ({', '.join(norms)}): the tables take differences "
                f"to it; add norm={report.baseline} to the grid or pick one of these"
            )
        if report.select and all(not c.get("dataset.val_size") for c in configs.values()):
            raise UserError(
                "report.select chooses on validation accuracy, but every run has "
                "dataset.val_size=0 (no validation split); set dataset.val_size"
            )
        frame = frame_of(list(configs.values()))
        frame.attrs["config_columns"] = list(frame.columns)
        swept = swept_keys(frame)
        for key in report.select or []:
            try:
                column = resolve_key(frame, key)
            except UserError as err:
                raise UserError(f"report.select: {err}; nothing ran") from None
            if column not in swept:
                raise UserError(
                    f"report.select: cannot select {key}: the sweep does not vary it "
                    f"(it varies: {', '.join(swept) or 'nothing'}); nothing ran"
                )


# ------------------------------------------------------------------------------ the jobs


class SweepDisplay(Protocol):
    """What a sweep shows while its jobs run (:class:`normbench.views.progress.SweepProgress`
    draws it). The display follows the runs done from the run folders on its own; the
    sweep hands it each run that trains in this process (the basic launcher), for that
    run's own bar."""

    def run_display(self, cfg) -> AbstractContextManager[Callbacks]:
        """The training loop's callbacks for one run, shown while the run lasts."""
        ...


#: The sweep's display, when jobs run in this process (the basic launcher).
_display: SweepDisplay | None = None


def run_job(cfg) -> str:
    """Hydra's task function: one run; its status. Never raises for a failed run; a run
    stopped from outside (Ctrl-C, SIGTERM, SIGHUP, a scheduler) raises, after it is
    recorded."""
    from normbench import terminal

    terminal.clean_logs()  # in a worker or a cluster job too: what it logs shown cleaned
    if os.environ.get(DRIVER_ENV) not in (None, str(os.getpid())):
        # a job in a process of its own: its warnings as the CLI shows them
        warnings.showwarning = terminal.show_warning
    from normbench import interrupts  # (no torch)

    # A stop signal (a time limit) while torch imports would leave it half imported, and
    # the job could not record its run: held back until the job's recording scope below.
    held = contextlib.ExitStack()
    held.enter_context(interrupts.held_back())
    try:  # the job's first imports (torch among them)
        from normbench import queued
        from normbench.lock import slurm_job
        from normbench.runner import RunInProgress, record_unfinished, run, run_dir
        from normbench.validation import settle, validate
    except Exception:
        # Hydra returns the exception to the sweep, which records its message: the
        # traceback goes to the job's log (a worker's, a cluster job's) only from here.
        from normbench.terminal import print_exception

        print_exception()  # cleaned: the job's log may be the terminal
        held.close()
        raise

    try:
        _adopt_config_dirs()
        # The config as Hydra composed it, put in the form its run id is taken from (the
        # plan's) before anything records the run: a job stopped before its run settled
        # it recorded a twin folder under another id.
        settle(cfg, notify=False)
        from normbench.ranks import follower

        # a SLURM task of rank > 0 of a data-parallel run: rank 0's task records the run
        quiet = follower(cfg)
        retry = os.environ.get(RETRY_ENV) == "1"
        display = _display.run_display(cfg) if _display is not None else contextlib.nullcontext()
        watchdog = interrupts.watch_parent(os.environ.get(DRIVER_ENV))
    except BaseException as error:
        if isinstance(error, Exception):  # its traceback in the job's log, as above
            from normbench.terminal import print_exception

            print_exception()
        held.close()
        raise
    stopped = False
    # From the job's first moment to its record: a time-limit signal while torch imports
    # counts too, and a second signal cannot cut the record short.
    with interrupts.handle_signals():
        try:
            held.close()  # a stop signal that came while importing is delivered here
            with display as bar:
                if os.environ.get(DRIVER_ENV) != str(os.getpid()):
                    # Hydra composed this job here; the plan checked its twin elsewhere
                    validate(cfg)
                outcome = run(cfg, redo_failed=retry, display=bar)
        except RunInProgress:
            return "running elsewhere"
        except interrupts.ProcessLost as lost:  # recorded (interrupted); the sweep goes on
            from normbench.terminal import clean

            print(clean(f"normbench: {run_dir(cfg)}: {lost.reason}"), file=sys.stderr)
            return "interrupted"
        except (KeyboardInterrupt, interrupts.Interrupted) as stop:
            stopped = True
            if not quiet:
                record_unfinished(cfg, "interrupted", interrupts.reason(stop))
            if watchdog is not None and watchdog.fired:
                os._exit(1)  # a worker whose driver is gone: nothing to return to
            if os.environ.get(DRIVER_ENV) not in (None, str(os.getpid())):
                # A job in a process of its own (cluster, worker): its run is recorded; end
                # the process with one line rather than a traceback in the job's log.
                from normbench.terminal import clean

                print(
                    clean(f"normbench: {run_dir(cfg)}: {interrupts.reason(stop)}"), file=sys.stderr
                )
                raise SystemExit(1) from None
            raise
        except Exception as error:  # recorded as failed (or interrupted); the sweep goes on
            from normbench.norms.registry import error_text
            from normbench.terminal import clean, print_exception

            why = interrupts.reason(error)  # submitit's time-limit error is not the run's fault
            message = why or f"{type(error).__name__}: {error_text(error)}"
            if isinstance(error, UserError):  # a user's norm that failed: one line naming it
                message = str(error)
                print(clean(f"failed: {message}"), file=sys.stderr)
            elif why is None:
                print_exception()  # into the job's log (a worker's, a cluster job's), cleaned
            status = "interrupted" if why else "failed"
            if quiet:  # its process ends with an error: SLURM ends the job's step
                raise SystemExit(1) from None
            record_unfinished(cfg, status, message)
            return status
        finally:
            if watchdog is not None:
                watchdog.stop()
            if not (stopped or quiet):  # a stopped job's marker stays: submitit may requeue it
                queued.remove(run_dir(cfg), slurm_job())
    return "skipped" if outcome.skipped else outcome.summary["status"]


def _adopt_config_dirs() -> None:
    """In a job's own process (a worker, a cluster job): the user's config folders, from
    the search path Hydra gave it, so that its messages name a norm's YAML file as the
    driver's do (the driver has them from the command line already)."""
    from hydra.core.hydra_config import HydraConfig

    from normbench.options import adopt_config_dir

    if not HydraConfig.initialized():
        return
    for entry in HydraConfig.get().searchpath or []:
        if isinstance(entry, str) and entry.startswith("file://"):
            folder = Path(entry.removeprefix("file://")).resolve()
            if folder.is_dir():
                adopt_config_dir(folder)


class SweepInterrupted(Exception):
    """The sweep was stopped (Ctrl-C, SIGTERM); ``message`` says what became of its jobs."""


def launch(sweep_plan: Plan, display: SweepDisplay | None = None) -> None:
    """Run the plan's runs left to run through Hydra's multirun (and the launcher its
    overrides pick). Nothing is launched when every run is done."""
    if not sweep_plan.to_run:
        return
    import hydra

    from normbench import interrupts, launchers
    from normbench.options import conf_dir

    global _display
    saved_argv = sys.argv
    saved_env = {key: os.environ.get(key) for key in (RETRY_ENV, DRIVER_ENV)}
    first = sweep_plan.to_run[0]
    sys.argv = [
        "normbench",
        "--multirun",
        *absolute_paths(sweep_plan.overrides, first.cfg),
        "hydra.sweeper._target_=hydra_plugins.normbench_sweeper.PlannedSweeper",
    ]
    os.environ[RETRY_ENV] = "1" if sweep_plan.retry_failed else "0"
    os.environ[DRIVER_ENV] = str(os.getpid())
    _display = display
    launchers.launching = sweep_plan
    main = hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    try:
        # A stop signal reaches the jobs this process started too (launchers.stop_workers);
        # what they could not record is recorded here, before a second signal is heeded.
        with interrupts.handle_signals(on_stop=launchers.stop_workers(sweep_plan)):
            try:
                main(run_job)()
            except (KeyboardInterrupt, interrupts.Interrupted) as stop:
                launchers.settle(sweep_plan, interrupts.reason(stop))
                raise
    finally:
        sys.argv = saved_argv
        _display = launchers.launching = None
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
