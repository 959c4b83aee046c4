"""Why a run stopped before its end: signals turned into exceptions that carry the reason.

A run stopped from outside (Ctrl-C, ``kill``, a closed terminal, a scheduler cancelling
it or reaching its time limit) is recorded as ``interrupted`` with the reason, and a
later sweep redoes it. Inside :func:`handle_signals` SIGINT raises Python's
``KeyboardInterrupt``, SIGTERM and SIGHUP raise :class:`Interrupted`, and, inside a
submitit job, submitit's time-limit handler (SIGUSR2, which checkpoints and requeues the
job where it can) is wrapped so that the run is recorded before the process goes. The
first of these signals stops the process; later ones are ignored while it records its
run and releases its lock (a terminal's Ctrl-C or hang-up reaches a sweep's workers
directly and again through their driver), so a second signal never leaves a run half
recorded.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class Interrupted(BaseException):
    """The run was stopped from outside; ``reason`` says how, ``signum`` by which signal.

    A ``BaseException``, as ``KeyboardInterrupt`` is: no ``except Exception`` between the
    signal and the runner may take it for the run's own failure.
    """

    def __init__(self, reason: str, signum: int = signal.SIGTERM):
        super().__init__(reason)
        self.reason, self.signum = reason, signum


class ProcessLost(Interrupted):
    """A data-parallel run stopped because one of its processes failed (an exit status, a
    signal, a hang past the process group's timeout), not by a stop from outside: recorded
    ``interrupted`` (the next run resumes it), it ends ``normbench run`` with status 1,
    and a sweep goes on with its other jobs."""


#: The signals that stop a run (submitit's time-limit signal aside, :func:`submitit_signal`).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: The signals that stop a run besides Ctrl-C's SIGINT, and what each one means.
STOP_REASONS = {
    signal.SIGTERM: "terminated by SIGTERM (kill, or a scheduler's cancel)",
    signal.SIGHUP: "hung up by SIGHUP (its terminal closed, or kill -HUP)",
}


def reason(error: BaseException) -> str | None:
    """The reason a run was interrupted, or None when ``error`` is the run's own failure."""
    if isinstance(error, Interrupted):
        return error.reason
    if isinstance(error, KeyboardInterrupt):
        return "interrupted by SIGINT (Ctrl-C)"
    if isinstance(error, SystemExit):
        return f"the process exited (SystemExit {error.code})"
    if type(error).__name__ == "UncompletedJobError" and "submitit" in type(error).__module__:
        # submitit's time-limit handler, raised where no wrapper stood (see handle_signals)
        return f"SLURM time limit or preemption: {error}"
    return None


def ignore_further_stops() -> None:
    """From now on, ignore the stop signals (main thread only): a command that was stopped
    and has recorded it is ending with the first signal's status. A second signal in the
    moment between its handlers' removal and its exit killed it, exit status and all."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def exit_status(stop: BaseException) -> int:
    """128 + the number of the signal that stopped the process, as a shell reports a
    process that signal ended: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP; 1 for a
    run one of whose processes failed (:class:`ProcessLost`)."""
    if isinstance(stop, ProcessLost):
        return 1
    if isinstance(stop, Interrupted):
        return 128 + int(stop.signum)
    return 128 + int(signal.SIGINT)


#: A more precise reason for the next SIGTERM, set by whoever sends it from inside.
_pending_reason: str | None = None

#: How many :func:`handle_signals` are open in the main thread: the outermost installs
#: the handlers and puts the previous ones back.
_depth = 0
#: The signal that is stopping this process, once one came: later ones are ignored.
_stopping: int | None = None
#: ``_stopping`` while :func:`recording`: a stop signal then waits in ``_deferred``.
_RECORDING = 0
_deferred: int | None = None
#: What the open scopes asked to do when a stop signal comes, before it raises.
_on_stop: list[Callable[[int], None]] = []


def _stop(signum: int, frame) -> None:
    global _stopping, _deferred
    if _holding and _stopping is None:
        _note(signum, frame)  # raised where held_back is left
        return
    if _stopping is not None:
        if _stopping == _RECORDING and _deferred is None:
            _deferred = signum  # raised once the record is written
        return  # already stopping: the run is recording itself, which must not be cut short
    _stopping = signum
    if signum == signal.SIGHUP:
        leave_dead_terminal()
    for action in list(_on_stop):
        action(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted(_pending_reason or STOP_REASONS[signum], signum)


def leave_dead_terminal() -> None:
    """Point stdin, stdout and stderr that are a hung-up terminal at /dev/null.

    A closed terminal fails every write with EIO: the run must still record itself, the
    progress display stop and the process exit with its status, not a traceback that
    cannot be shown either. A terminal that is still there (``kill -HUP`` from another
    one) keeps showing the output."""
    import termios

    for fd in (0, 1, 2):
        try:
            termios.tcgetattr(fd)
        except termios.error as err:
            if err.args and err.args[0] == errno.EIO:  # hung up (a pipe or file: ENOTTY)
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, fd)
                os.close(null)
        except (OSError, ValueError):
            continue


def submitit_signal() -> int:
    """The signal SLURM sends a submitit job before its time limit (or to preempt it):
    submitit's own setting, SIGUSR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, f"SIG{name}", signal.SIGUSR2)


def _wrap_submitit(previous):
    """submitit's handler checkpoints and requeues the job (then exits) or raises that it
    cannot; either way the run is interrupted, and says which. SLURM's SIGTERM at the
    time limit that may follow is then ignored while the run records itself."""

    def handler(received, frame):
        global _stopping
        if _holding and _stopping is None:
            _note(received, frame)  # raised where held_back is left
            return
        try:
            previous(received, frame)
        except SystemExit:
            _stopping = received
            raise Interrupted(
                "SLURM time limit or preemption: requeued by submitit, to run again", received
            ) from None
        except Exception as err:  # submitit's UncompletedJobError: no requeue left
            _stopping = received
            raise Interrupted(f"SLURM time limit or preemption: {err}", received) from None

    return handler


@contextlib.contextmanager
def handle_signals(on_stop: Callable[[int], None] | None = None) -> Iterator[None]:
    """While inside, SIGINT raises ``KeyboardInterrupt``, SIGTERM and SIGHUP raise
    :class:`Interrupted` (and submitit's time-limit signal too) in the main thread, once:
    later stop signals are ignored until the outermost scope is left, where the previous
    handlers come back. A signal the process was started to ignore (SIGHUP under
    ``nohup``, SIGINT in a shell's background job) stays ignored. ``on_stop(signum)``
    runs first, in the main thread (a sweep's driver stops its workers there). Scopes
    nest: a run inside a sweep's driver shares the driver's. Elsewhere than the main
    thread (signals cannot be handled there) it does nothing."""
    global _depth, _stopping, _deferred
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved: dict[int, object] = {}
    _depth += 1
    if on_stop is not None:
        _on_stop.append(on_stop)
    try:
        if _depth == 1:
            _stopping = _deferred = None
            for signum in STOP_SIGNALS:
                current = signal.getsignal(signum)
                if current is signal.SIG_IGN and signum != signal.SIGTERM:
                    continue
                saved[signum] = _beneath(signum, signal.signal(signum, _stop))
        usr = submitit_signal()
        current = _beneath(usr, signal.getsignal(usr))
        if callable(current) and getattr(current, "__module__", None) != __name__:
            signal.signal(usr, _wrap_submitit(current))
            saved[usr] = current
        yield
    finally:
        for signum, handler in saved.items():
            # left inside a held_back scope still open: its noting handler again, over this one
            signal.signal(signum, _note if signum in _beneath_note else handler)
        if on_stop is not None:
            _on_stop.remove(on_stop)
        _depth -= 1


@contextlib.contextmanager
def held_back() -> Iterator[None]:
    """The stop signals (SIGINT, SIGTERM, SIGHUP, submitit's time-limit signal) held while
    inside and delivered as it is left, where their handlers raise at a safe point. For
    importing torch: an exception raised halfway through leaves its C extensions half
    registered (the next import of them aborts the process: pybind11's "cannot initialize
    type ...: an object with that name is already defined"), or leaves torch half
    initialized, its next use failing (a SLURM time limit recorded as the run's failure),
    so a run stopped while it started could not record itself. Elsewhere than the main
    thread: nothing.

    A signal that comes is noted and raised again on the way out, not blocked: a thread's
    signal mask is its own, and a signal to the process goes to any thread that does not
    block it (a native library's, such as OpenBLAS's pool), whose C-level handler has
    Python run the handler in the main thread all the same. Inside
    :func:`handle_signals` its handlers note the signal themselves; elsewhere a noting
    handler stands in for the one in force (which :func:`handle_signals`, entered inside,
    takes as the one to put back). A signal the process ignores stays ignored. Nothing
    is to fork inside it: a forked child would hold the signals for good."""
    global _holding
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noting: list[int] = []
    _holding += 1
    try:
        if _holding == 1:
            for signum in (*STOP_SIGNALS, submitit_signal()):
                current = signal.getsignal(signum)
                if current is signal.SIG_IGN or current is None or signum in noting:
                    continue  # ignored; or set outside Python, and could not be put back
                if getattr(current, "__module__", None) == __name__:
                    continue  # handle_signals' handlers: they note it while held
                _beneath_note[signum] = signal.signal(signum, _note)
                noting.append(signum)
        yield
    finally:
        # The handlers put back while still holding (a signal meanwhile is noted, not
        # raised here, which would leave the rest undone), then the noted ones delivered.
        for signum in noting:
            underneath = _beneath_note.pop(signum)
            if signal.getsignal(signum) is _note:  # else replaced inside, by handle_signals
                signal.signal(signum, underneath)
        _holding -= 1
        if not _holding:
            try:
                while _noted:
                    _deliver(_noted.pop(0))
            finally:
                _noted.clear()  # the first to raise stops the process: the rest are moot


#: How many :func:`held_back` scopes the main thread is inside, and the signals that came
#: meanwhile, in order.
_holding = 0
_noted: list[int] = []
#: The handler :func:`held_back`'s noting handler stands in for, by signal.
_beneath_note: dict[int, Any] = {}


def _note(signum: int, frame) -> None:
    if signum not in _noted:
        _noted.append(signum)


def _deliver(signum: int) -> None:
    """A noted signal to the handler now in force, in this (the main) thread: called, as
    the signal would have called it (a main thread that blocks the signal would never see
    it raised again), or else raised, for its default action."""
    handler = signal.getsignal(signum)
    if callable(handler):
        handler(signum, None)
    elif handler is not signal.SIG_IGN:
        signal.raise_signal(signum)


def _beneath(signum: int, handler: Any) -> Any:
    """The handler in force for ``signum`` as it will be once :func:`held_back` is left:
    ``handler`` itself, unless it is held_back's noting handler."""
    return _beneath_note.get(signum, handler) if handler is _note else handler


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether process ``pid`` is a descendant of ``ancestor`` on this machine (from /proc:
    False where there is none)."""
    for _ in range(64):  # a process tree is never that deep; a loop must end
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        # The command name (field 2) may hold spaces and parentheses: fields follow the last ')'.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == ancestor:
            return True
        if parent <= 1:
            return False
        pid = parent
    return False


class ParentWatch:
    """Stops this process's run when its parent (the sweep's driver) is gone, or, given
    ``alive``, when that says the watched process is gone (saying ``reason``)."""

    def __init__(
        self,
        parent: int,
        poll_s: float,
        alive: Callable[[], bool] | None = None,
        reason: str = "the sweep's driver process died",
    ):
        self.parent, self.poll_s = parent, poll_s
        # reparented: the driver died (kill -9, OOM)
        self.alive = alive or (lambda: os.getppid() == parent)
        self.reason = reason
        self.fired = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="driver-watch", daemon=True)
        _watches.append(self)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            if not self.alive():
                self.fired = True
                global _pending_reason
                _pending_reason = self.reason
                os.kill(os.getpid(), signal.SIGTERM)
                # A job not yet inside a run has no handler: SIGTERM ends it. One whose
                # run does not stop within a minute is ended here.
                if self._stop.wait(60):
                    return
                os._exit(1)

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(ValueError):
            _watches.remove(self)


#: The watches open in this process (:func:`watched_gone`).
_watches: list[ParentWatch] = []


def start_time(pid: int) -> str | None:
    """When process ``pid`` started (/proc: clock ticks since boot), or None where it is
    not running (a zombie, not yet reaped by its parent, has ended). With the pid it
    names one process: a pid is used again, the pair is not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # fields 3 on: the state, ..., the start time
    return None if fields[0] == "Z" else fields[19]


def watch_launcher(launcher: dict[str, str], poll_s: float = 1.0) -> ParentWatch | None:
    """In a worker of a data-parallel run: a watch that stops the run when the launching
    process (``launcher``: its ``pid`` and ``start`` time, :func:`start_time`) is gone.
    Its elastic agent stops the workers when it is stopped; killed outright (kill -9, the
    OOM killer), it left them training, orphans of its fork server. None without /proc
    (macOS), where a process's start time cannot be read."""
    if start_time(os.getpid()) is None or not launcher.get("start"):
        return None
    pid, started = int(launcher["pid"]), launcher["start"]
    return ParentWatch(
        pid,
        poll_s,
        alive=lambda: start_time(pid) == started,
        reason="the launching process died",
    )


def watched_gone() -> str | None:
    """The reason of an open watch whose process is gone, looked at now rather than at the
    watch's next poll: a collective that failed because another worker saw the launcher
    gone first failed for that reason, not for the other worker's own."""
    for watch in list(_watches):
        if not watch.alive():
            return watch.reason
    return None


@contextlib.contextmanager
def recording() -> Iterator[None]:
    """While inside, this process writes what must not be cut in two: how its run ended
    without a signal (its own failure, a peer's), or an epoch's metrics and checkpoint. A
    stop signal that comes meanwhile (its watch's SIGTERM, a Ctrl-C) waits until the block
    is done and raises as it is left. (It had cut a run's record short, leaving no
    summary, and had stopped a run between an epoch's metrics and its checkpoint, which
    the resume then trained again.) A process already stopping by a signal ignores
    further ones anyway. (Blocking the signal would not do: it goes to another thread,
    which leaves the Python handler to the main thread at once.)"""
    global _stopping, _deferred
    if (
        not _depth
        or _stopping is not None
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return
    _stopping = _RECORDING
    try:
        yield
    finally:
        deferred, _deferred, _stopping = _deferred, None, None
        if deferred is not None:
            _stop(deferred, None)  # raises


def watch_parent(driver: str | None, poll_s: float = 1.0) -> ParentWatch | None:
    """In a worker process whose parent is the sweep's driver (``driver``: its pid), a
    watch that stops the run when the driver dies, so that workers (joblib's) never
    outlive it. None in the driver itself, and where the driver is not the parent
    (cluster jobs, which go on by design)."""
    if not driver or not driver.isdigit():
        return None
    pid = int(driver)
    if pid == os.getpid() or pid != os.getppid():
        return None
    return ParentWatch(pid, poll_s)
