"""Sweeps: a grid of runs through Hydra's multirun, so its launcher plugins apply unchanged.

:func:`plan` expands the grid exactly as Hydra's basic sweeper will (the command
line's sweeps plus an experiment preset's ``hydra.sweeper.params``) and checks every
job before anything trains: each config composes and validates, and each distinct
(data set, model, norm, batch size, ...) builds and survives one training-mode
forward pass. One bad value anywhere fails the whole sweep with one message.

:func:`launch` then hands the same overrides to Hydra (``--multirun``): the basic
launcher runs the jobs one after another in this process, ``hydra/launcher=joblib``
in parallel worker processes, ``hydra/launcher=submitit_slurm`` as SLURM jobs. Every
job is :func:`run_job`: one :func:`normbench.runner.run`, which skips a run whose
folder already holds a completed summary (and a failed or diverged one unless
``--retry-failed``), and records a run that raises as ``failed`` so the sweep goes on.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normbench.errors import UserError

#: Set by the sweep command for its jobs (environment, so joblib and SLURM workers see it).
RETRY_ENV = "NORMBENCH_RETRY_FAILED"


@dataclass
class Job:
    overrides: list[str]
    cfg: Any
    run_id: str
    run_dir: Path
    previous: str | None  # status already on disk, or None


@dataclass
class Plan:
    """The grid, checked: one :class:`Job` per run, in Hydra's order."""

    overrides: list[str]
    jobs: list[Job] = field(default_factory=list)
    retry_failed: bool = False

    def skipped(self, job: Job) -> bool:
        done = ("completed",) if self.retry_failed else ("completed", "diverged", "failed")
        return job.previous in done

    @property
    def to_run(self) -> list[Job]:
        return [job for job in self.jobs if not self.skipped(job)]

    @property
    def experiment_dirs(self) -> list[Path]:
        return sorted({job.run_dir.parent.parent for job in self.jobs})

    def outcome(self) -> Counter:
        """How the jobs ended: ``skipped`` (done before), ``completed``, ``diverged``,
        ``failed``, and ``not run`` (no summary: interrupted, or a job never started)."""
        from normbench.results import read_summary

        counts: Counter = Counter()
        for job in self.jobs:
            if self.skipped(job):
                counts["skipped"] += 1
                continue
            summary = read_summary(job.run_dir)
            counts[summary["status"] if summary else "not run"] += 1
        return counts


def _sweeper_params(overrides: Sequence[str]) -> list[str]:
    """An experiment preset's ``hydra.sweeper.params``, as ``key=values`` overrides."""
    from hydra import compose, initialize_config_dir

    from normbench.config import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    params = cfg.hydra.sweeper.get("params") or {}
    return [f"{key}={value}" for key, value in params.items()]


def expand(overrides: Sequence[str]) -> list[list[str]]:
    """The jobs' overrides, in the order and with the precedence of Hydra's basic sweeper."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from normbench.config import check_group_overrides, compose

    check_group_overrides(overrides)
    parser = OverridesParser.create()
    try:
        first = BasicSweeper.split_arguments(parser.parse_overrides(list(overrides)), None)[0][0]
    except HydraException as err:
        raise UserError(f"invalid sweep: {str(err).splitlines()[0]}") from None
    compose(first)  # a bad key or value in the plain config says so here, clearly
    try:
        params = _sweeper_params(first)
    except HydraException as err:
        raise UserError(_launcher_message(err, overrides)) from None
    try:
        batches = BasicSweeper.split_arguments(parser.parse_overrides([*params, *overrides]), None)
    except HydraException as err:
        raise UserError(f"invalid sweep: {str(err).splitlines()[0]}") from None
    return [list(job) for job in batches[0]]


def _launcher_message(err: Exception, overrides: Sequence[str]) -> str:
    text = str(err).splitlines()[0]
    for override in overrides:
        if override.startswith("hydra/launcher="):
            name = override.split("=", 1)[1]
            extra = {"joblib": "parallel", "submitit_slurm": "slurm", "submitit_local": "slurm"}
            hint = f' (pip install -e ".[{extra[name]}]")' if name in extra else ""
            return f"hydra launcher {name!r} is not available{hint}: {text}"
    return f"invalid config: {text}"


def plan(overrides: Sequence[str], retry_failed: bool = False) -> Plan:
    """Expand and check the whole grid; raise :class:`UserError` on the first bad job."""
    from normbench.config import EXECUTION_KEYS, compose, flatten
    from normbench.results import read_summary
    from normbench.runner import prepare, run_dir, run_id

    result = Plan(list(overrides), retry_failed=retry_failed)
    checked: set[str] = set()
    for job_overrides in expand(overrides):
        try:
            cfg = compose(job_overrides)
        except UserError as err:
            raise UserError(f"in sweep job {' '.join(job_overrides)}: {err}") from None
        rid, folder = run_id(cfg), run_dir(cfg)
        summary = read_summary(folder)
        result.jobs.append(Job(job_overrides, cfg, rid, folder, summary and summary["status"]))
        # Seeds, learning rates and where results go do not change whether a job can run.
        shape = {k: v for k, v in flatten(cfg).items() if k not in {"seed", "lr", *EXECUTION_KEYS}}
        key = json.dumps(shape, sort_keys=True, default=str)
        if key in checked:
            continue
        checked.add(key)
        try:
            prepare(cfg)  # loads each data set once (runner's cache), builds, probes
        except UserError as err:
            raise UserError(f"in sweep job {' '.join(job_overrides)}: {err}") from None
    return result


# ------------------------------------------------------------------------------ the jobs

#: The sweep's display, when jobs run in this process (the basic launcher).
_display: SweepProgress | None = None


def _threads_for_parallel_jobs(cfg) -> None:
    """Under the joblib launcher, share the cores among the jobs running at once."""
    from hydra.core.hydra_config import HydraConfig

    if cfg.threads is not None or not HydraConfig.initialized():
        return
    launcher = HydraConfig.get().launcher
    n_jobs = launcher.get("n_jobs") if "n_jobs" in launcher else None
    if n_jobs is None:
        return
    from normbench.runner import default_threads

    cores = default_threads()
    parallel = cores if n_jobs < 0 else n_jobs
    with _writable(cfg):
        cfg.threads = max(1, cores // max(1, parallel))


@contextlib.contextmanager
def _writable(cfg) -> Iterator[None]:
    from omegaconf import OmegaConf, open_dict

    readonly = OmegaConf.is_readonly(cfg)
    OmegaConf.set_readonly(cfg, False)
    with open_dict(cfg):
        yield
    OmegaConf.set_readonly(cfg, readonly)


def run_job(cfg) -> str:
    """Hydra's task function: one run; its status. Never raises for a failed run."""
    from normbench.runner import run

    _threads_for_parallel_jobs(cfg)
    retry = os.environ.get(RETRY_ENV) == "1"
    display = _display.run_display(cfg) if _display is not None else contextlib.nullcontext()
    try:
        with display as bar:
            outcome = run(cfg, redo_failed=retry, display=bar)
    except KeyboardInterrupt:
        raise
    except Exception:  # recorded in the run's summary.json as failed; the sweep goes on
        return "failed"
    return "skipped" if outcome.skipped else outcome.summary["status"]


def launch(sweep_plan: Plan, display: SweepProgress | None = None) -> None:
    """Run the plan's jobs through Hydra's multirun (and the launcher its overrides pick)."""
    import hydra

    from normbench.config import conf_dir

    global _display
    argv, environ = sys.argv, os.environ.get(RETRY_ENV)
    sys.argv = ["normbench", "--multirun", *sweep_plan.overrides]
    os.environ[RETRY_ENV] = "1" if sweep_plan.retry_failed else "0"
    _display = display
    main = hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    try:
        main(run_job)()
    finally:
        sys.argv = argv
        _display = None
        if environ is None:
            os.environ.pop(RETRY_ENV, None)
        else:
            os.environ[RETRY_ENV] = environ


# ------------------------------------------------------------------------------ progress


class SweepProgress:
    """Runs done / total with an ETA (from the run folders, so it works for every
    launcher), and each in-process run's own bar."""

    def __init__(self, sweep_plan: Plan, console=None, poll_s: float = 1.0):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.plan = sweep_plan
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=None),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            expand=True,
        )
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> SweepProgress:
        self.total = self.progress.add_task("sweep", total=len(self.plan.to_run), unit="runs")
        self.progress.start()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._refresh()
        self.progress.stop()

    def _refresh(self) -> None:
        from normbench.results import read_summary

        done = sum(read_summary(job.run_dir) is not None for job in self.plan.to_run)
        self.progress.update(self.total, completed=done)

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._refresh()

    @contextlib.contextmanager
    def run_display(self, cfg) -> Iterator[Any]:
        """A bar for one run drawn inside the sweep's display; removed when it ends."""
        bar = _RunBar(self.progress, f"{cfg.norm.name} bs={cfg.batch_size} seed={cfg.seed}")
        try:
            yield bar
        finally:
            if bar.task is not None:
                self.progress.remove_task(bar.task)
            self._refresh()


class _RunBar:
    """One run's steps, as a task of the sweep's progress display (``train.Callbacks``)."""

    def __init__(self, progress, label: str):
        self.progress, self.label, self.task = progress, label, None
        self.epochs = 0

    def on_start(self, total_steps: int, epochs: int) -> None:
        self.epochs = epochs
        self.task = self.progress.add_task(self.label, total=total_steps, unit="steps")

    def on_step(self, step: int, epoch: int, loss: float, img_per_s: float) -> None:
        description = f"{self.label} · epoch {epoch}/{self.epochs} · loss {loss:.3f}"
        self.progress.update(self.task, completed=step, description=description)

    def on_epoch(self, record: dict[str, Any]) -> None:
        pass
