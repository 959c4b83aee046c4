"""Why a run stopped before its end: signals turned into exceptions that carry the reason.

A run stopped from outside (Ctrl-C, ``kill``, a scheduler cancelling it or reaching its
time limit) is recorded as ``interrupted`` with the reason, and a later sweep redoes
it. Ctrl-C arrives as Python's ``KeyboardInterrupt``; :func:`handle_signals` makes
SIGTERM raise :class:`Interrupted` too, and, inside a submitit job, wraps submitit's
time-limit handler (SIGUSR2, which checkpoints and requeues the job where it can) so
that the run is recorded before the process goes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator


class Interrupted(BaseException):
    """The run was stopped from outside; ``reason`` says how.

    A ``BaseException``, as ``KeyboardInterrupt`` is: no ``except Exception`` between the
    signal and the runner may take it for the run's own failure.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


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


#: A more precise reason for the next SIGTERM, set by whoever sends it from inside.
_pending_reason: str | None = None


def _raise_on(signum: int, text: str):
    def handler(received, frame):
        raise Interrupted(_pending_reason or text)

    return handler


def _submitit_signal() -> int:
    # submitit's own setting for the signal SLURM sends before the time limit
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, f"SIG{name}", signal.SIGUSR2)


def _wrap_submitit(previous):
    """submitit's handler checkpoints and requeues the job (then exits) or raises that it
    cannot; either way the run is interrupted, and says which."""

    def handler(received, frame):
        try:
            previous(received, frame)
        except SystemExit:
            raise Interrupted(
                "SLURM time limit or preemption: requeued by submitit, to run again"
            ) from None
        except Exception as err:  # submitit's UncompletedJobError: no requeue left
            raise Interrupted(f"SLURM time limit or preemption: {err}") from None

    return handler


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """While inside, SIGTERM (and submitit's time-limit signal) raise :class:`Interrupted`
    in the main thread; the previous handlers come back on exit. Elsewhere than the main
    thread (signals cannot be handled there) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved: dict[int, object] = {}
    try:
        saved[signal.SIGTERM] = signal.signal(
            signal.SIGTERM,
            _raise_on(signal.SIGTERM, "terminated by SIGTERM (kill, or a scheduler's cancel)"),
        )
        usr = _submitit_signal()
        current = signal.getsignal(usr)
        if callable(current) and getattr(current, "__module__", None) != __name__:
            saved[usr] = signal.signal(usr, _wrap_submitit(current))
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


class ParentWatch:
    """Stops this process's run when its parent (the sweep's driver) is gone."""

    def __init__(self, parent: int, poll_s: float):
        self.parent, self.poll_s = parent, poll_s
        self.fired = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="driver-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            if os.getppid() != self.parent:  # reparented: the driver died (kill -9, OOM)
                self.fired = True
                global _pending_reason
                _pending_reason = "the sweep's driver process died"
                os.kill(os.getpid(), signal.SIGTERM)
                # A job not yet inside a run has no handler: SIGTERM ends it. One whose
                # run does not stop within a minute is ended here.
                if self._stop.wait(60):
                    return
                os._exit(1)

    def stop(self) -> None:
        self._stop.set()


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
