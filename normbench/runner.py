"""One run: check and build everything, train, write the run folder; skip it when done.

Everything a user can get wrong (the config, the data, the norm's arguments) is
checked and built before the first file is written, so a bad run leaves nothing
behind. The run folder is ``<out_dir>/<name>/runs/<run_id>``, where ``run_id`` is
a hash of the resolved config: the same config always lands in the same folder.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normbench import __version__, cores, interrupts
from normbench.build import Prepared, load_data, local_batch, prepare
from normbench.config import EXECUTION_KEYS, flatten
from normbench.errors import NotWritten, UserCodeFailed, UserError
from normbench.lock import LockNotAFile, RunBusy, RunLock, read_owner
from normbench.ranks import follow, resume_run
from normbench.rundir import (
    BN_STATS_FILE,
    CHECKPOINT_FILE,
    RUN_FILES,
    TRACKERS_FILE,
    BnStatsLog,
    check_writable,
    metrics_frame,
    read_summary,
    status_of,
    summary_of,
    write_bytes,
    write_csv,
    write_json,
)
from normbench.rundir import write_text as write_text_file
from normbench.schema import ID_DEFAULTS, RunRecord, record_fields
from normbench.validation import settle

#: The file in a run's folder that holds the traceback of a user's norm that failed in it.
ERROR_LOG = "error.log"

#: Set on an interruption once the run has recorded it (:func:`recorded`).
RECORDED = "_normbench_recorded"


@dataclass
class RunOutcome:
    run_id: str
    run_dir: Path
    summary: dict[str, Any]
    skipped: bool = False
    #: a SLURM task of rank > 0: rank 0 recorded the run; ``summary`` holds its status alone
    follower: bool = False


def run_id(cfg, flat: dict[str, Any] | None = None) -> str:
    """A stable hash of the resolved config, seed included, output and execution keys left
    out. ``flat``: the config already flattened (``config.flatten``), where the caller has it."""
    flat = flatten(cfg) if flat is None else flat
    record = {
        k: v
        for k, v in flat.items()
        if k not in EXECUTION_KEYS and not (k in ID_DEFAULTS and str(v) == str(ID_DEFAULTS[k]))
    }
    text = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def experiment_dir(cfg) -> Path:
    return Path(cfg.out_dir) / cfg.name


def run_dir(cfg) -> Path:
    return experiment_dir(cfg) / "runs" / run_id(cfg)


class _Recorder:
    """Saves metrics.csv (and the checkpoint, when one is kept) after every epoch and
    passes the loop's reports on to a display."""

    def __init__(self, run_id: str, path: Path, display=None, checkpoint=None, trackers=None):
        self.run_id, self.path, self.display = run_id, path, display
        self.trackers = trackers  # normbench.trackers.Trackers: the run's, or None
        self.records: list[dict[str, Any]] = []
        # (model, optimizer) whose states go into the checkpoint; None: no checkpoint
        self.saving = checkpoint
        self.bn_stats = None  # diagnostics.EpochDiagnostics, when the run measures them
        self.steps = 0  # the optimizer steps of the epochs recorded (a resume's, before)
        self.step = 0  # the loop's last step

    def on_start(self, total_steps: int, epochs: int) -> None:
        if self.display is not None:
            self.display.on_start(total_steps, epochs)

    def on_step(self, step: int, epoch: int, loss: float, img_per_s: float) -> None:
        self.step = step
        if self.display is not None:
            self.display.on_step(step, epoch, loss, img_per_s)

    def on_epoch(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.steps = self.step
        write_csv(self.path, metrics_frame(self.run_id, self.records))
        if self.trackers:
            self.trackers.log_epoch(record)
        if self.bn_stats is not None:
            from normbench import distributed

            with distributed.local():  # rank 0 alone: no collective the others would join
                self.bn_stats(record["epoch"])
        if self.display is not None:
            self.display.on_epoch(record)

    def checkpoint(self, loop: dict[str, Any]) -> None:
        if self.saving is None:
            return
        from normbench import checkpoints

        model, optimizer = self.saving
        data = checkpoints.pack(self.run_id, model, optimizer, loop)
        write_bytes(self.path.with_name(CHECKPOINT_FILE), data)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def summary_record(
    cfg,
    rid: str,
    result,
    prepared: Prepared | None,
    started: str | None,
    wall: float | None,
    resumed_from: int | None = None,
) -> dict:
    """What the run writes to summary.json: its :class:`~normbench.schema.RunRecord` (a
    field missing or misspelt here fails), then its config (``rundir.summary_of``).
    ``prepared`` None: a run that stopped before it was built (what it would have measured
    is null)."""
    from importlib.metadata import version

    config = flatten(cfg)
    done = [r for r in result.records if "test_acc" in r]
    validated = [r for r in done if "val_acc" in r]
    # the first epoch of the best validation accuracy (ties: the earlier, as early stopping)
    best = max(validated, key=lambda r: r["val_acc"], default=None)
    last = result.records[-1] if result.records else {}
    train_time = sum(r["epoch_time_s"] for r in done)
    images = sum(r["img_per_s"] * r["epoch_time_s"] for r in done)
    built = prepared is not None
    world = cfg.processes * cfg.nodes
    if built:  # (torch is imported then; a driver recording a lost job need not)
        from normbench.norms.batchrenorm import ramp_end_step
    record = RunRecord(
        run_id=rid,
        status=result.status,
        # the config values the record holds (name, model, norm, batch_size, lr, ...)
        **{f.name: config[f.config] for f in record_fields() if f.config},
        lr_effective=prepared.settings.lr if built else None,
        world_size=world,
        batch_size_per_process=cfg.batch_size // world,
        norm_batch_size=prepared.norm.norm_batch_size(cfg.batch_size // world, world)
        if built
        else None,
        steps=result.steps,
        renorm_ramp_end_step=ramp_end_step(prepared.norm.kwargs) if built else None,
        final_test_acc=done[-1]["test_acc"] if done else None,
        best_test_acc=max(r["test_acc"] for r in done) if done else None,
        final_val_acc=validated[-1]["val_acc"] if validated else None,
        best_val_acc=best["val_acc"] if best else None,
        best_val_epoch=best["epoch"] if best else None,
        test_acc_at_best_val=best["test_acc"] if best else None,
        test_acc_precise_bn=last.get("test_acc_precise_bn"),
        test_acc_batch_stats=last.get("test_acc_batch_stats"),
        bn_eval_time_s=last.get("bn_eval_time_s"),
        resumed_from_epoch=resumed_from,
        final_test_loss=done[-1]["test_loss"] if done else None,
        final_train_loss=last.get("train_loss"),
        final_train_acc=last.get("train_acc"),
        train_time_s=train_time,
        wall_time_s=wall,
        img_per_s=images / train_time if train_time > 0 else None,
        num_params=sum(p.numel() for p in prepared.model.parameters()) if built else None,
        device=prepared.device if built else None,
        threads=prepared.threads.count if built else None,
        threads_from=prepared.threads.source if built else None,
        memory_format=prepared.memory_format if built else None,
        error=result.message,
        started_at=started,
        finished_at=_now(),
        # A driver recording a lost job need not import torch: the installed package says.
        torch_version=sys.modules["torch"].__version__
        if "torch" in sys.modules
        else version("torch"),
        normbench_version=__version__,
        bn_stats_time_s=getattr(prepared and prepared.bn_stats, "seconds", None),
    )
    # The config rides along, so that aggregating thousands of runs reads one file each.
    return summary_of(record, config)


#: Statuses that make a run done: a sweep skips it. Failed and diverged runs count as done
#: unless retried (``--retry-failed``); an interrupted run never does.
FINAL = ("completed",)
FINAL_UNLESS_RETRIED = ("diverged", "failed")


def is_done(summary: dict[str, Any] | None, redo_failed: bool) -> bool:
    """Whether a run with this summary is done; the planner and the runner both ask here.
    A summary without a known status (damaged, hand-edited) is not done."""
    status = status_of(summary)
    return status in FINAL or (not redo_failed and status in FINAL_UNLESS_RETRIED)


class RunInProgress(UserError):
    """Another live process owns the run (a second sweep, orphaned cluster jobs, a user)."""

    def __init__(self, busy: RunBusy):
        super().__init__(
            f"run {busy.folder.name} is in progress elsewhere ({busy.owner.describe()}): "
            "not started; its results appear in its folder when it ends"
        )
        self.busy = busy


def run(cfg, *, force: bool = False, redo_failed: bool = True, display=None) -> RunOutcome:
    """Run one experiment, or skip it when its folder already holds a completed run.

    ``force`` reruns a completed run; ``redo_failed`` reruns failed and diverged ones.
    ``display`` receives the training loop's progress (see ``train.Callbacks``).
    The run folder is owned (locked) while the run trains: :class:`RunInProgress` when
    another live process owns it. A run that raises is recorded as ``failed``, one stopped
    from outside (Ctrl-C, SIGTERM, SIGHUP, a scheduler) as ``interrupted``, and the
    exception propagates.
    """
    # A stop signal raises once: a second one cannot cut short the record or the lock's
    # release (interrupts.handle_signals).
    with interrupts.handle_signals():
        try:
            return _run(cfg, force=force, redo_failed=redo_failed, display=display)
        except (KeyboardInterrupt, interrupts.Interrupted):
            from normbench import distributed

            distributed.stop_server()  # a data-parallel run's, its workers stopped
            raise


def _run(cfg, *, force: bool, redo_failed: bool, display) -> RunOutcome:
    from normbench import distributed

    settle(cfg, notify=False)  # a sweep's job as Hydra composed it: the plan's form, told
    rid = run_id(cfg)
    folder = experiment_dir(cfg) / "runs" / rid
    task = distributed.slurm_task(cfg.processes * cfg.nodes)  # one of a SLURM job's tasks
    distributed.check_nodes(cfg.nodes, slurm=task is not None)
    if task is not None:
        return _run_task(cfg, rid, folder, task, force=force, redo_failed=redo_failed)
    return _own(cfg, rid, folder, force=force, redo_failed=redo_failed, display=display)


def _own(cfg, rid, folder, *, force: bool, redo_failed: bool, display, start=None) -> RunOutcome:
    """Check, lock, prepare and train the run, writing its folder. ``start``: how rank 0
    of a SLURM job's tasks trains it (:func:`_run_task`), given the prepared run and the
    loop's state to resume from; None: this process trains it, or the processes it
    launches."""
    from omegaconf import OmegaConf

    from normbench import distributed

    previous = read_summary(folder)
    if is_done(previous, redo_failed) and not force:
        return RunOutcome(rid, folder, previous, skipped=True)
    check_run_folder(folder)  # nothing is written or removed through a link
    owner = read_owner(folder)
    if owner is not None and owner.alive:  # say so before loading anything (torch too)
        raise RunInProgress(RunBusy(folder, owner))
    with interrupts.held_back():  # torch whole (its C extensions), or not at all
        # torch (with the checkpoint module, which the run needs): not for a run that is
        # done or busy
        from normbench import checkpoints  # noqa: F401
    # not after an hour of training: the run folder itself (read-only, a file in its
    # place), or the folders it goes into when it does not exist yet
    check_writable(folder)

    if start is None and cfg.processes * cfg.nodes > 1:  # its workers' imports, meanwhile
        distributed.prestart(distributed.WORKER_MODULES)
    # a SLURM task's check of the model alone: its peers are not checking theirs with it
    alone = distributed.local() if start is not None else contextlib.nullcontext()
    with alone:
        prepared = prepare(cfg, threads=cores.choose(cfg.threads))

    folder.mkdir(parents=True, exist_ok=True)
    try:
        lock = RunLock(folder).__enter__()
    except RunBusy as busy:
        raise RunInProgress(busy) from None
    try:
        # Another process may have finished the run since the check above.
        previous = read_summary(folder)
        if is_done(previous, redo_failed) and not force:
            return RunOutcome(rid, folder, previous, skipped=True)
        # An interrupted run goes on from its last epoch; any other starts over.
        resume = None
        if not force and status_of(previous) in (None, "interrupted"):
            with alone:
                resume, prepared = resume_run(cfg, rid, folder, prepared)
        # From here on files are written; the summary, written last, marks the run done.
        for name in ("summary.json", "metrics.csv", ERROR_LOG):  # the earlier attempt's
            _discard(folder / name)
        if resume is None:  # a new attempt: a new checkpoint, new trackers' runs
            _discard(folder / CHECKPOINT_FILE)
            _discard(folder / TRACKERS_FILE)
        write_text_file(folder / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        records = resume["records"] if resume else []
        write_csv(folder / "metrics.csv", metrics_frame(rid, records))
        if start is not None:
            return start(prepared, resume)
        if cfg.processes * cfg.nodes > 1:  # the lock stays here, with the launcher
            return _train_parallel(cfg, rid, folder, prepared.threads, display)
        return _train(cfg, rid, folder, prepared, display, resume)
    finally:
        lock.release()


def _run_task(cfg, rid: str, folder: Path, task, *, force: bool, redo_failed: bool) -> RunOutcome:
    """This process as one task (``task``: its rank) of a SLURM job that runs the run's
    processes, one per task (the sweep's launcher asked for processes x nodes tasks).
    Every task joins the process group first. Rank 0 then does what a one-process run
    does (checks, takes the lock, prepares, resumes, writes the folder) and tells the
    others whether the run trains, and from which epoch (:func:`distributed.tell`);
    they then build the run, restore the checkpoint where there is one, and train with
    it, writing nothing. A rank that fails ends its process: a collective of the
    others fails or times out, and SLURM ends the job's step."""
    from normbench import distributed
    from normbench.validation import resolve_device

    distributed.join_task(task, resolve_device(cfg.device), cfg.dist_timeout_s)
    try:
        if task.rank > 0:
            status = follow(cfg, rid, folder, task)
            return RunOutcome(
                rid, folder, {"status": status}, skipped=status is None, follower=True
            )
        told = False

        def start(prepared: Prepared, resume) -> RunOutcome:
            nonlocal told
            told = True
            distributed.tell(("train", resume["epoch"] if resume else None))
            return _train(cfg, rid, folder, prepared, None, resume, task)

        try:
            return _own(cfg, rid, folder, force=force, redo_failed=redo_failed, display=None,
                        start=start)  # fmt: skip
        finally:
            if not told:  # skipped (done, owned elsewhere), refused, or stopped
                with contextlib.suppress(Exception):  # (the others may be gone)
                    distributed.tell(None)
    finally:
        distributed.leave()


def _train_parallel(cfg, rid: str, folder: Path, threads: cores.Threads, display) -> RunOutcome:
    """Train on ``processes`` workers (:func:`distributed.launch`), rank 0 writing the run
    folder and sending its progress here for ``display``. A worker that fails ends the
    run as ``interrupted`` (the others stopped: a collective failed, or the agent's
    SIGTERM), with the ranks that failed and how, and the next run resumes it; a failure
    rank 0 recorded as its own (failed) stays."""
    import threading

    from normbench import distributed

    cores.warn_oversubscribed(cfg.processes)
    events = distributed.context().SimpleQueue()
    relay = threading.Thread(target=distributed.relay, args=(events, display), daemon=True)
    relay.start()
    env = distributed.worker_environment()
    data = load_data(cfg)  # the launcher's, from its cache (on the CPU)
    shared = data if distributed.shareable(data) else None
    args = (cfg, rid, folder, threads, events, env, shared)
    try:
        distributed.launch(_rank_main, args, cfg.processes, rid)
    except distributed.RanksFailed as failed:
        summary = read_summary(folder)
        if status_of(summary) == "failed":
            raise RuntimeError(f"run {rid} failed: {summary.get('error')}") from None
        record = dict(summary) if summary else _lost_summary(cfg, "interrupted", "")
        record.update(status="interrupted", error=failed.reason)
        write_json(folder / "summary.json", record)
        stop = interrupts.ProcessLost(f"a process of the run stopped: {failed.reason}")
        setattr(stop, RECORDED, True)
        raise stop from None
    except BaseException as stop:
        summary = read_summary(folder)
        if status_of(summary) in (None, "interrupted"):  # (rank 0 may have recorded it)
            record = dict(summary) if summary else _lost_summary(cfg, "interrupted", "")
            record.update(status="interrupted", error=interrupts.reason(stop) or str(stop))
            write_json(folder / "summary.json", record)
            with contextlib.suppress(AttributeError):
                setattr(stop, RECORDED, True)
        raise
    finally:
        events.put(None)
        relay.join(timeout=5)
    return RunOutcome(rid, folder, read_summary(folder))


def _rank_main(cfg, rid, folder, threads: cores.Threads, events, env=None, data=None) -> None:
    """One worker of a data-parallel run: take the launcher's environment (``env``:
    :func:`distributed.worker_environment`), join the process group, build the run (its
    threads: the run's over the processes; ``data``: the launcher's data set, or None
    to load it), resume from the checkpoint where there is one
    (each rank reads it), train; rank 0 writes the folder. A rank stopped by another's
    failure exits with :data:`distributed.PEER_LOST`."""
    import torch

    from normbench import distributed
    from normbench.train import train
    from normbench.validation import resolve_device

    distributed.take_environment(env)
    device = resolve_device(cfg.device)
    share = cores.per_process(threads, cfg.processes)
    launcher = (env or {}).get("launcher") or {}
    watch = interrupts.watch_launcher(launcher) if launcher else None
    try:
        with interrupts.handle_signals():
            rank = distributed.join(device, cfg.dist_timeout_s)
            try:
                with distributed.local():  # its probes as the launcher's: no collective
                    prepared = prepare(cfg, data, threads=share)
                    resume, prepared = resume_run(cfg, rid, folder, prepared)
                if rank.rank == 0:
                    forward = distributed.Forward(events)  # alone at the end: all threads
                    _train(cfg, rid, folder, prepared, forward, resume, rank, threads.count)
                else:
                    generator = torch.Generator().manual_seed(cfg.seed)
                    data, optimizer = prepared.data, prepared.optimizer
                    settings = prepared.settings
                    train(prepared.model, data, optimizer, settings, generator, None, resume, rank)
            except Exception as err:
                if distributed.lost_peer(err):
                    distributed.peer_lost()
                raise
            finally:
                distributed.leave()
    except (KeyboardInterrupt, interrupts.Interrupted) as stop:
        # stopped from outside (the agent's SIGTERM, once the launcher was stopped; a signal
        # to this process; the launcher's death): rank 0 recorded the run, and the launcher
        # says so. The shell's status for the signal, without the traceback multiprocessing
        # prints for each rank
        raise SystemExit(interrupts.exit_status(stop)) from None
    finally:
        if watch is not None:
            watch.stop()


def run_files() -> tuple[str, ...]:
    """The files a run writes into its folder, which a new attempt removes or replaces."""
    return (*RUN_FILES, CHECKPOINT_FILE, BN_STATS_FILE, TRACKERS_FILE)


def check_run_folder(folder: Path) -> None:
    """A :class:`UserError` when the run could not be written without touching what is
    not normbench's: its folder or the ``runs/`` folder holding it is a symbolic link (a
    received folder's link may point anywhere: the files would be written, and the
    earlier attempt's removed, there), or a folder with something in it stands where
    one of the run's files goes (normbench removes its own files, never a folder's
    contents). ``out_dir`` and the experiment folder may be links a user made."""
    from normbench.rundir import check_real_folder

    check_real_folder(folder.parent)
    check_real_folder(folder)
    for name in run_files():
        path = folder / name
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                continue
        except OSError:  # none; or a folder not to be looked at: the writes say so
            continue
        try:
            with os.scandir(path) as entries:
                empty = next(entries, None) is None
        except OSError:  # a folder that cannot be looked into is not known to be empty
            empty = False
        if not empty:
            raise UserError(
                f"{path} is a folder with something in it, where the run's {name} goes: "
                "normbench removes only its own files; move it away to run this run"
            )


def _discard(path: Path) -> None:
    """Remove a run file of an earlier attempt: a link in its place is removed, not what
    it points to; an empty folder in its place too (one with something in it was refused
    by :func:`check_run_folder`)."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            os.rmdir(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _train(
    cfg, rid: str, folder: Path, prepared: Prepared, display, resume=None, rank=None, alone=None
) -> RunOutcome:
    """Train and record the run (``rank``: rank 0 of a data-parallel run's, which writes;
    ``alone``: the run's threads, its own a share, for the measures it takes alone)."""
    import torch

    from normbench import distributed
    from normbench.norms.registry import describe_error, error_text
    from normbench.trackers import open_trackers
    from normbench.train import TrainResult, train

    saving = (prepared.model, prepared.optimizer) if cfg.checkpoint.save == "last" else None
    loop = resume  # restored by _resume into the model, optimizer and random generators
    resumed = loop["epoch"] if loop else None
    trackers = open_trackers(cfg, rid, folder, resumed)
    recorder = _Recorder(rid, folder / "metrics.csv", display, saving, trackers)
    generator = torch.Generator().manual_seed(cfg.seed)
    if loop is not None:
        recorder.records, recorder.steps = list(loop["records"]), loop["steps"]
    _start_bn_stats(cfg, prepared, recorder, loop)
    started, clock = _now(), time.perf_counter()
    try:
        with interrupts.handle_signals():
            result = train(
                prepared.model,
                prepared.data,
                prepared.optimizer,
                prepared.settings,
                generator,
                recorder,
                resume=loop,
                rank=rank,
            )
            if result.status == "completed":
                _measure_inference(cfg, prepared, result, recorder, alone)
    except NotWritten:
        raise  # the disk is full, or the folder gone read-only: nothing more can be written
    except BaseException as err:
        # a stop signal now (a watch's, say) would cut the record short: it waits
        with interrupts.recording():
            # a collective that failed because another process did fails wherever it was
            # called from, a user's norm layer too: not that code's failure
            lost = rank is not None and distributed.lost_peer(err)
            users = not lost and _users_failure(err, prepared.norm)
            why = None if users else interrupts.reason(err)
            if why is None and lost:
                why = interrupts.watched_gone() or (
                    f"another process of the run stopped ({error_text(err)})"
                )
            result = TrainResult(
                records=recorder.records,
                status="interrupted" if why else "failed",
                steps=recorder.steps,  # those of the epochs on record, which a resume goes on after
            )
            result.message = why or f"{type(err).__name__}: {error_text(err)}"
            if users:
                result.message = f"{prepared.norm.label()}: {describe_error(err)}"
                write_text_file(folder / ERROR_LOG, _traceback(err))
            if not why:  # a failure is retried from the start; an interruption resumes
                _discard(folder / CHECKPOINT_FILE)
            if result.records:  # the epochs the summary counts: a stop may have cut that write
                write_csv(folder / "metrics.csv", metrics_frame(rid, result.records))
            summary = summary_record(
                cfg, rid, result, prepared, started, time.perf_counter() - clock, resumed
            )
            write_json(folder / "summary.json", summary)
            trackers.finish(result.records, summary)
        if users:
            raise UserCodeFailed(
                f"{prepared.norm.label()} failed in training: {describe_error(err)}; the run "
                f"is recorded as failed, its traceback is in {folder / ERROR_LOG}"
            ) from None
        if why:  # the CLI says so: this run's summary holds it
            with contextlib.suppress(AttributeError):
                setattr(err, RECORDED, True)
        raise
    if result.status == "diverged":
        # The partial epoch's training loss is recorded too: it shows where it broke.
        write_csv(folder / "metrics.csv", metrics_frame(rid, result.records))
    summary = summary_record(
        cfg, rid, result, prepared, started, time.perf_counter() - clock, resumed
    )
    write_json(folder / "summary.json", summary)
    trackers.finish(result.records, summary)
    if not cfg.checkpoint.keep:
        _discard(folder / CHECKPOINT_FILE)
    return RunOutcome(rid, folder, summary)


def _start_bn_stats(cfg, prepared: Prepared, recorder: _Recorder, loop) -> None:
    """Per-layer BatchNorm diagnostics each epoch (``eval.bn_stats``); else no bn_stats.csv."""
    from normbench.diagnostics import EpochDiagnostics

    path = recorder.path.with_name(BN_STATS_FILE)
    bn = EpochDiagnostics(prepared.model, prepared.data, local_batch(cfg, prepared.norm), cfg.seed)
    if not (cfg.eval.bn_stats and bn.layers):  # (a model without running statistics: none)
        return _discard(path)
    bn.write = BnStatsLog(path, recorder.run_id, loop and loop["epoch"]).add  # (resumed: kept)
    prepared.bn_stats = recorder.bn_stats = bn


def _users_failure(err: BaseException, norm) -> bool:
    """Whether a run's exception is its user's norm class's doing (its traceback passes
    through their code: :meth:`NormSpec.raised`), to be told as one line naming the class,
    not as a traceback as normbench's own bugs are. An interruption never is."""
    if norm is None or isinstance(err, KeyboardInterrupt | interrupts.Interrupted):
        return False
    return norm.raised(err)


def _traceback(err: BaseException) -> str:
    """The exception's full traceback, as Python prints it, for the run's error log."""
    import traceback

    return "".join(traceback.format_exception(err))


def resumable(cfg) -> bool:
    """Whether the run's folder keeps a checkpoint (its last finished epoch), which the
    next run of its config goes on from."""
    return (run_dir(cfg) / CHECKPOINT_FILE).is_file()


def recorded(stop: BaseException) -> bool:
    """Whether the run that ``stop`` (Ctrl-C, a signal) ended recorded itself as
    interrupted: False when it stopped before it trained (nothing of it is on disk)."""
    return getattr(stop, RECORDED, False)


def _measure_inference(cfg, prepared: Prepared, result, recorder: _Recorder, threads=None) -> None:
    """BatchNorm's other inference estimators (:mod:`normbench.inference`), recorded on
    the last epoch (on ``threads`` threads where given); the model keeps its running
    statistics."""
    import torch

    from normbench import distributed
    from normbench.inference import measure

    clock, before = time.perf_counter(), torch.get_num_threads()
    batch = local_batch(cfg, prepared.norm)
    sizes = (batch, cfg.eval_batch_size, cfg.eval.precise_bn_images, cfg.seed)
    torch.set_num_threads(threads or before)
    try:
        with distributed.local():  # rank 0 alone, of a data-parallel run
            measured = measure(prepared.model, prepared.data, *sizes)
    finally:
        torch.set_num_threads(before)
    if measured:
        result.records[-1].update(measured, bn_eval_time_s=time.perf_counter() - clock)
        write_csv(recorder.path, metrics_frame(recorder.run_id, result.records))


def record_lost(
    cfg,
    reason: str,
    slurm_job: str | None = None,
    unstarted: bool = False,
    keep_own: bool = False,
) -> bool:
    """Record a run whose job died outside Python (cancelled, killed, out of memory, node
    failure, time limit) as ``interrupted`` with ``reason``; the sweep's driver calls it
    when its launcher reports such a job. ``slurm_job``: the dead job, whose lock may be
    taken over at once. ``unstarted``: record it even if the job never started the run
    (a job cancelled while queued). ``keep_own``: a reason the run recorded itself (its
    signal handler) stays, ``reason`` is added after it. A run that finished, or is
    owned by a live process, is left as it is. Whether the run was recorded."""
    from normbench.lock import break_lock

    settle(cfg, notify=False)  # as Hydra composed it, maybe: in the form the run id is of
    folder = run_dir(cfg)
    try:
        check_run_folder(folder)
    except UserError:  # written nowhere through a link: the sweep reports the run as lost
        return False
    if not folder.is_dir():
        if not unstarted:
            return False  # the job never started this run: nothing to record
        folder.mkdir(parents=True, exist_ok=True)
    try:
        owner = read_owner(folder)
    except LockNotAFile:  # the run could not have started: nothing of it to record
        return False
    if owner is not None and owner.alive:
        if not (slurm_job and owner.slurm_job == slurm_job):
            return False
        if not break_lock(folder, owner.token):
            return False
    try:
        with RunLock(folder):  # takes over a lock whose owner is gone
            previous = read_summary(folder)
            if status_of(previous) in (*FINAL, *FINAL_UNLESS_RETRIED):
                return False  # a result: never overwritten
            record = dict(previous) if previous else _lost_summary(cfg, "interrupted", "")
            own = record.get("error")
            record["error"] = f"{own}; {reason}" if keep_own and own else reason
            write_json(folder / "summary.json", record)
    except (RunBusy, LockNotAFile):  # owned, or a lock in the way that is not a file
        return False
    return True


def record_unfinished(cfg, status: str, message: str) -> bool:
    """Record a sweep job's run that stopped before it could record itself (while
    loading or building, after the plan had checked it) with ``status`` (failed,
    interrupted), so that the sweep counts it and the reason is on disk. A run with a
    summary, or owned elsewhere, is left as it is."""
    settle(cfg, notify=False)  # as Hydra composed it, maybe: in the form the run id is of
    folder = run_dir(cfg)
    if read_summary(folder) is not None:
        return False
    try:
        check_run_folder(folder)
    except UserError:  # written nowhere through a link: the sweep reports the run as lost
        return False
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with RunLock(folder):
            if read_summary(folder) is not None:
                return False
            write_json(folder / "summary.json", _lost_summary(cfg, status, message))
    except (RunBusy, LockNotAFile):  # owned, or a lock in the way that is not a file
        return False
    return True


def _lost_summary(cfg, status: str, message: str) -> dict[str, Any]:
    """A summary for a run that left none: what its config says, nothing it measured."""
    from normbench.train import TrainResult

    result = TrainResult(status=status, message=message)
    return summary_record(cfg, run_id(cfg), result, None, None, None)
