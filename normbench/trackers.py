"""Experiment trackers: a run's config, per-epoch metrics and summary, logged to
TensorBoard, MLflow or Weights & Biases as well as to its folder (the ``logger`` group).

Each tracker goes through its tool's own client library, imported only when the run
picks it. A sweep logs each of its runs once, under the sweep's name (the MLflow
experiment, the W&B group; TensorBoard's default folder is the experiment's). A run
resumed from its checkpoint goes on with the tracker's run it started: the trackers' own
run ids are kept in the run folder (``rundir.TRACKERS_FILE``). A tracker that is not
installed, or that raises, is told in one warning line and left out for the rest of the
run: tracking never fails a run.

The training loop knows nothing of trackers: the runner's recorder hands them each
epoch's record, and the run's end hands them its summary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

from normbench.config import flatten
from normbench.rundir import RECORD_METRICS, read_trackers, split_summary, write_trackers

#: Each tracker's package, and the extra that installs it.
PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
}

#: How a run's status reads in MLflow (``RunStatus``) and as W&B's exit code.
_MLFLOW_STATUS = {"completed": "FINISHED", "interrupted": "KILLED"}


class Tracker(Protocol):
    """One tool's logging of one run. ``id``: the tool's own id of the run (kept in the
    run folder to go on with it when the run resumes), or None."""

    id: str | None

    def start(self, run_id: str, config: dict[str, Any], experiment: str, resume: Resume) -> None:
        """Open the tool's run: a new one, or ``resume.id``'s when the run resumes."""

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """One epoch's metrics (``split/metric``: ``test/acc``), at step ``epoch``."""

    def log_summary(self, epoch: int, summary: dict[str, Any]) -> None:
        """The run's summary record (``summary.json`` less its config)."""

    def log_figures(self, step: int, figures: list[Path]) -> None:
        """Image files (``plots/<name>``) at step ``step``."""

    def finish(self, status: str) -> None:
        """Close the tool's run with the run's status (completed, failed, ...)."""


class Resume:
    """What a tracker goes on from: its own run id of an earlier attempt (None: a new
    run) and the epochs that attempt logged (0: none)."""

    def __init__(self, id: str | None, epochs: int):  # noqa: A002 - the tools' word
        self.id, self.epochs = id, epochs


def epoch_metrics(record: dict[str, Any], keys=None) -> dict[str, float]:
    """An epoch record's metrics as the trackers name them (``split/metric``), the
    values metrics.csv holds (``keys``: only these of the record's)."""
    return {
        "/".join(RECORD_METRICS[key]): float(value)
        for key, value in record.items()
        if key in RECORD_METRICS and value is not None and (keys is None or key in keys)
    }


def summary_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The summary record's measured numbers (``summary/final_test_acc``); its config
    values (batch_size, lr) are the run's parameters already."""
    from normbench.schema import record_fields

    record, _ = split_summary(summary)
    held = {f.name for f in record_fields() if f.config}
    return {
        f"summary/{key}": float(value)
        for key, value in record.items()
        if key not in held and isinstance(value, int | float) and not isinstance(value, bool)
    }


def _warn(name: str, when: str, err: BaseException) -> None:
    """The one line a failing tracker gets (plain text, on stderr)."""
    from normbench.terminal import clean

    if isinstance(err, ImportError):
        package, extra = PACKAGES[name]
        why = f'{package} is not installed (pip install "normbench[{extra}]")'
    else:
        text = str(err).strip().splitlines()
        why = f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
    sys.stderr.write(f"warning: logger {name} {when}: {clean(why)}; it logs nothing more\n")
    sys.stderr.flush()


@contextlib.contextmanager
def _quiet():
    """The tools' own notices (MLflow's INFO lines, SQLAlchemy's deprecations) kept off
    the terminal, where normbench's progress is (the tools set their loggers' levels
    when imported: logging is switched off below errors instead)."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(before)


class Trackers:
    """The run's trackers; each one that raises is warned about once and dropped."""

    def __init__(self, folder: Path, trackers: dict[str, Tracker]):
        self.folder, self.active = folder, dict(trackers)
        self.logged: dict[int, set[str]] = {}  # epoch -> its record's keys logged

    def __bool__(self) -> bool:
        return bool(self.active)

    def _each(self, when: str, call) -> None:
        for name, tracker in list(self.active.items()):
            try:
                with _quiet():
                    call(tracker)
            except Exception as err:  # any tool's failure: the run goes on without it
                del self.active[name]
                _warn(name, when, err)
                with contextlib.suppress(Exception), _quiet():
                    tracker.finish("failed")

    def log_epoch(self, record: dict[str, Any]) -> None:
        """One epoch's record, as metrics.csv holds it."""
        if not self.active:
            return
        epoch = record["epoch"]
        self.logged[epoch] = set(record)
        metrics = epoch_metrics(record)
        self._each(f"failed at epoch {epoch}", lambda t: t.log_epoch(epoch, metrics))

    def finish(self, records: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        """The run's end: the last epoch's metrics measured after it was logged (PreciseBN,
        on a completed run), the summary, and the status."""
        if not self.active:
            return
        last = records[-1] if records else {}
        epoch = last.get("epoch", 0)
        late = set(last) - self.logged.get(epoch, set())
        if late:
            metrics = epoch_metrics(last, late)
            self._each("failed at the end", lambda t: t.log_epoch(epoch, metrics))
        self._each("failed at the end", lambda t: t.log_summary(epoch, summary))
        self.close(summary.get("status", "failed"))

    def close(self, status: str) -> None:
        """Each tracker's run closed with ``status``."""
        for name, tracker in list(self.active.items()):
            try:
                with _quiet():
                    tracker.finish(status)
            except Exception as err:
                _warn(name, "failed at the end", err)
        self.active.clear()


def open_trackers(cfg, run_id: str, folder: Path, resumed_epoch: int | None) -> Trackers:
    """Start the trackers ``cfg.logger`` picks for the run in ``folder``, going on with
    their earlier runs when the run resumes after ``resumed_epoch``; their ids are kept
    in the run folder. None picked: nothing is imported or written."""
    node = cfg.get("logger")
    if not _picked(node):
        return Trackers(folder, {})
    config = {k: v for k, v in flatten(cfg).items() if not k.startswith("logger")}
    return _start(node, folder, run_id, config, cfg.name, resumed_epoch)


def _picked(node) -> list[str]:
    """The trackers a ``logger`` node picks, in :data:`TRACKERS`' order."""
    return [name for name in TRACKERS if hasattr(node, "get") and node.get(name) is not None]


def _start(node, folder: Path, name: str, config, experiment: str, resumed: int | None):
    """The picked trackers started (each that fails warned of and left out), going on
    with the runs whose ids ``folder`` keeps when ``resumed`` (the step logged up to)."""
    earlier = read_trackers(folder) if resumed else {}
    started: dict[str, Tracker] = {}
    for tool in _picked(node):
        settings = dict(node.get(tool))
        resume = Resume(earlier.get(tool), resumed or 0)
        try:
            tracker = TRACKERS[tool](settings)
            with _quiet():
                tracker.start(name, config, experiment, resume)
        except Exception as err:
            _warn(tool, "failed to start", err)
            continue
        started[tool] = tracker
    ids = {tool: t.id for tool, t in started.items() if t.id}
    if ids:
        write_trackers(folder, ids)
    return Trackers(folder, started)


#: The tracker runs that hold an experiment's figures are named so (one per experiment).
FIGURES_RUN = "figures"


def log_figures(node, experiment_dir: Path, figures: list[Path], step: int) -> None:
    """A sweep's figures of the experiment in ``experiment_dir`` to the trackers the
    ``logger`` settings ``node`` picks: into one tracker run per experiment, named
    :data:`FIGURES_RUN`, whose ids the experiment folder keeps (``trackers.json``), so
    that each later sweep logs into the same run, at ``step`` (the runs the figures show)."""
    if not figures or not _picked(node):
        return
    experiment_dir = Path(experiment_dir)
    step = max(step, 1)
    trackers = _start(node, experiment_dir, FIGURES_RUN, {}, experiment_dir.name, step - 1)
    paths = [Path(p) for p in figures]
    trackers._each("failed to log the figures", lambda t: t.log_figures(step, paths))
    trackers.close("completed")


def _param(value: Any) -> str | int | float | bool:
    """A config value as the tools take a parameter: lists and null as JSON text."""
    if isinstance(value, str | int | float | bool):
        return value
    return json.dumps(value)


class TensorBoard:
    """Event files in ``<dir>/<run_id>``: a resumed run writes on in the same folder,
    and drops what an attempt logged past the epoch it resumes after (``purge_step``)."""

    def __init__(self, settings: dict[str, Any]):
        self.dir, self.id, self.writer = Path(settings["dir"]), None, None

    def start(self, run_id, config, experiment, resume):
        from torch.utils.tensorboard import SummaryWriter

        folder = self.dir / run_id
        folder.mkdir(parents=True, exist_ok=True)  # (SummaryWriter would create it quietly)
        self.writer = SummaryWriter(str(folder), purge_step=resume.epochs + 1)
        self.config = {k: _param(v) for k, v in config.items()}
        self.writer.add_text("config", json.dumps(config, indent=1), 0)

    def log_epoch(self, epoch, metrics):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, epoch)
        self.writer.flush()

    def log_summary(self, epoch, summary):
        from torch.utils.tensorboard.summary import hparams

        metrics = summary_metrics(summary)
        # TensorBoard's HParams view: the config against the summary's numbers
        for part in hparams(self.config, metrics):
            self.writer.file_writer.add_summary(part)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, epoch)

    def log_figures(self, step, figures):
        from matplotlib.image import imread

        for path in figures:
            image = imread(path)  # (height, width, channels), floats in [0, 1] for a PNG
            self.writer.add_image(f"plots/{path.stem}", image, step, dataformats="HWC")
        self.writer.flush()

    def finish(self, status):
        if self.writer is not None:
            self.writer.close()


class MLflow:
    """One MLflow run per normbench run (named by its run id) in the experiment named
    after the sweep; its id is kept to go on with it when the run resumes."""

    def __init__(self, settings: dict[str, Any]):
        self.uri, self.artifacts = settings["tracking_uri"], settings["artifact_dir"]
        self.id, self.client = None, None

    def start(self, run_id, config, experiment, resume):
        # A sweep's parallel jobs open one SQLite store at once: the first creates its
        # tables (alembic migrations), which others racing it break; one at a time here.
        with _store_lock(self.uri):
            self._start(run_id, config, experiment, resume)

    def _start(self, run_id, config, experiment, resume):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        if resume.id is not None:
            with contextlib.suppress(Exception):  # (gone: a store removed, another store)
                self.client.get_run(resume.id)
                self.id = resume.id
                self.client.update_run(self.id, status="RUNNING")
                return
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            location = Path(self.artifacts).resolve().as_uri()
            try:
                experiment_id = self.client.create_experiment(experiment, location)
            except Exception:  # another job of the sweep created it meanwhile
                found = self.client.get_experiment_by_name(experiment)
                if found is None:
                    raise
        if found is not None:
            experiment_id = found.experiment_id
        run = self.client.create_run(
            experiment_id, run_name=run_id, tags={"normbench.run_id": run_id}
        )
        self.id = run.info.run_id
        params = [Param(k, str(_param(v))) for k, v in config.items()]
        for at in range(0, len(params), 100):  # MLflow's most per call
            self.client.log_batch(self.id, params=params[at : at + 100])

    def log_epoch(self, epoch, metrics):
        self._metrics(epoch, metrics)

    def _metrics(self, step, metrics):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step) for key, value in metrics.items()]
        self.client.log_batch(self.id, metrics=batch)

    def log_figures(self, step, figures):
        for path in figures:  # the same path each time: the newest figures replace the last
            self.client.log_artifact(self.id, str(path), artifact_path="plots")

    def log_summary(self, epoch, summary):
        self._metrics(epoch, summary_metrics(summary))
        self.client.set_tag(self.id, "normbench.status", summary.get("status"))

    def finish(self, status):
        if self.client is not None and self.id is not None:
            self.client.set_terminated(self.id, _MLFLOW_STATUS.get(status, "FAILED"))


class Wandb:
    """One W&B run per normbench run (named by its run id) in the sweep's group, offline
    by default; its id is kept to go on with it (``resume="allow"``) when the run
    resumes."""

    def __init__(self, settings: dict[str, Any]):
        self.settings, self.id, self.run = settings, None, None

    def start(self, run_id, config, experiment, resume):
        import wandb

        self.id = resume.id or _wandb_id()
        folder = Path(self.settings["dir"])
        folder.mkdir(parents=True, exist_ok=True)
        # wandb.init puts its own sys.exit and sys.excepthook in place for the rest of the
        # process: a sweep's later runs, a user's norm calling sys.exit, would go through
        # them; the process's own are put back.
        hooks = sys.exit, sys.excepthook
        try:
            self._init(wandb, run_id, config, experiment, resume, folder)
        finally:
            sys.exit, sys.excepthook = hooks

    def _init(self, wandb, run_id, config, experiment, resume, folder):
        self.run = wandb.init(
            project=self.settings["project"],
            group=experiment,
            name=run_id,
            id=self.id,
            resume="allow" if resume.id else None,
            dir=str(folder),
            mode=self.settings["mode"],
            config=config,
            reinit="create_new",  # a sweep's jobs in one process: a run each
            settings=wandb.Settings(silent=True, console="off", save_code=False),
        )

    def log_epoch(self, epoch, metrics):
        self.run.log({**metrics, "epoch": epoch}, step=epoch)

    def log_figures(self, step, figures):
        import wandb

        self.run.log({f"plots/{path.stem}": wandb.Image(str(path)) for path in figures}, step=step)

    def log_summary(self, epoch, summary):
        self.run.summary.update({**summary_metrics(summary), "status": summary.get("status")})

    def finish(self, status):
        if self.run is not None:
            self.run.finish(exit_code=0 if status == "completed" else 1)
            self.run = None


@contextlib.contextmanager
def _store_lock(uri: str):
    """An exclusive lock beside a local SQLite store (``<db>.lock``) while it is held;
    nothing for a server, which serializes its own clients."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        yield
        return
    import fcntl

    path = Path(uri[len(prefix) :].split("?", 1)[0] + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _wandb_id() -> str:
    """A new W&B run id (eight lowercase letters and digits, as wandb makes them)."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


#: The trackers by their ``logger`` option, in the order they start.
TRACKERS: dict[str, type] = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": Wandb}
