"""Tests for normbench.interrupts: signals that stop a run become ``Interrupted`` with the
reason, and the run is recorded so; a worker stops when its driver dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest
from pty_session import Terminal

from normbench import interrupts
from normbench.interrupts import Interrupted


def test_reasons():
    assert interrupts.reason(Interrupted("why")) == "why"
    assert interrupts.reason(KeyboardInterrupt()) == "interrupted by SIGINT (Ctrl-C)"
    assert interrupts.reason(SystemExit(3)) == "the process exited (SystemExit 3)"
    assert interrupts.reason(RuntimeError("a bug")) is None


def test_sigterm_raises_interrupted_inside_and_not_after():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="SIGTERM"), interrupts.handle_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_stop_signal_is_ignored_while_the_first_is_handled():
    """The first stop signal raises; later ones (a terminal's Ctrl-C reaches a sweep's
    worker directly and again through its driver) are ignored until the outermost scope
    is left, so they cannot cut the run's record short. The next scope stops again."""
    handled = []
    with interrupts.handle_signals():
        with pytest.raises(Interrupted, match="SIGHUP") as stop, interrupts.handle_signals():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(1)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            os.kill(os.getpid(), signum)
            time.sleep(0.2)
        handled.append(stop.value.signum)
    assert handled == [signal.SIGHUP] and interrupts.exit_status(stop.value) == 129
    with pytest.raises(KeyboardInterrupt), interrupts.handle_signals():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    assert interrupts.exit_status(KeyboardInterrupt()) == 130


def test_a_stop_signal_while_a_run_records_its_failure_waits_for_the_record():
    """A run recording how it ended without a signal (a collective failed because another
    worker stopped) must not be cut short by a stop signal that comes meanwhile (its own
    watch's SIGTERM: the summary was never written): the signal raises once the record is
    written, and only the first of several. A recording that no signal interrupted leaves
    the scope stoppable (a sweep's driver, recording one run's failure, goes on to the
    next run and must still stop for Ctrl-C)."""
    written = []
    stopping = pytest.raises(Interrupted, match="SIGTERM")
    with stopping, interrupts.handle_signals(), interrupts.recording():
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            os.kill(os.getpid(), signum)
            time.sleep(0.2)
        written.append("summary")
    assert written == ["summary"]
    with interrupts.handle_signals():  # a sweep's driver
        with interrupts.handle_signals(), interrupts.recording():  # one run's failure
            written.append("failed run")
        with pytest.raises(KeyboardInterrupt), interrupts.handle_signals():  # the next run
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert written == ["summary", "failed run"]
    with interrupts.recording():  # outside every scope: nothing to hold back
        written.append("outside")


def test_a_launcher_watch_names_the_launcher_gone_as_soon_as_it_is():
    """A data-parallel worker's watch on its launcher: alive while it runs; once it has
    ended (a zombie is ended, and a process with its pid but another start time is
    another process), ``watched_gone`` says so at once, before the watch's own poll, and
    a stopped watch says nothing."""
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started = interrupts.start_time(launcher.pid)
    assert started is not None and started == interrupts.start_time(launcher.pid)
    watch = interrupts.watch_launcher({"pid": str(launcher.pid), "start": started}, poll_s=3600)
    other = interrupts.watch_launcher({"pid": str(launcher.pid), "start": "1"}, poll_s=3600)
    other.stop()  # (a watch that fired would stop this process)
    assert other.alive() is False  # the same pid, another start: another process
    try:
        assert interrupts.watched_gone() is None
        launcher.kill()
        deadline = time.time() + 10
        while interrupts.start_time(launcher.pid) is not None and time.time() < deadline:
            time.sleep(0.01)  # a zombie until reaped: ended already
        assert interrupts.watched_gone() == "the launching process died"
    finally:
        watch.stop()
        launcher.wait()
    assert interrupts.watched_gone() is None
    assert interrupts.start_time(launcher.pid) is None


def test_a_signal_ignored_at_start_stays_ignored():
    """Under `nohup` SIGHUP is ignored, as its user asked: a run does not stop for it."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with interrupts.handle_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.2)
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_submitits_time_limit_handler_is_wrapped(monkeypatch):
    """submitit's SIGUSR2 handler requeues then exits (SystemExit), or raises that it
    cannot requeue; either way the run sees Interrupted with what happened."""
    calls = []

    def requeues(signum, frame):
        calls.append(signum)
        raise SystemExit(-1)

    def cannot(signum, frame):
        raise RuntimeError("Job not requeued because: timed-out too many times.")

    for handler, expected in [(requeues, "requeued by submitit"), (cannot, "timed-out too many")]:
        previous = signal.signal(signal.SIGUSR2, handler)
        try:
            with pytest.raises(Interrupted, match=expected), interrupts.handle_signals():
                os.kill(os.getpid(), signal.SIGUSR2)
                time.sleep(1)
            assert signal.getsignal(signal.SIGUSR2) is handler
        finally:
            signal.signal(signal.SIGUSR2, previous)
    assert calls == [signal.SIGUSR2]


@pytest.mark.parametrize(
    ("signum", "status", "said", "force"),
    [
        (signal.SIGTERM, 143, "terminated by SIGTERM", False),
        (signal.SIGHUP, 129, "hung up by SIGHUP", True),
    ],
)
def test_a_signal_during_a_run_records_it_interrupted(tmp_path, signum, status, said, force):
    """`normbench run` sent SIGTERM, or SIGHUP from another terminal: exit 128 + the
    signal, one line, the summary says why, no lock (SIGHUP was: the process died at
    once, no summary and a stale lock). The line says what the same command does next:
    go on from the checkpoint, or (--force) start over."""
    command = _run_command(tmp_path) + (["--force"] if force else [])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = tmp_path / "default" / "runs"
    deadline = time.time() + 120
    while time.time() < deadline and not list(runs.glob("*/checkpoint.pt")):  # an epoch done
        time.sleep(0.05)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == status
    assert said in err and "recorded as interrupted" in err and "Traceback" not in err
    again = "runs it again from the start" if force else "resumes it after its last finished epoch"
    assert f"the same command again {again}" in err
    (summary,) = [json.loads(p.read_text()) for p in runs.glob("*/summary.json")]
    assert summary["status"] == "interrupted" and said.split()[-1] in summary["error"]
    assert not list(runs.glob("*/.lock"))
    # the steps of the epochs on record, one each (it said 0 after dozens of epochs)
    epochs = pd.read_csv(next(runs.glob("*/metrics.csv"))).epoch.nunique()
    assert epochs > 0 and summary["steps"] == epochs


def test_a_worker_stops_when_its_parent_dies(tmp_path):
    """A child that watches its parent (the driver) ends itself once the parent is gone."""
    marker = tmp_path / "stopped"
    child = textwrap.dedent(
        f"""
        import os, time
        from normbench import interrupts
        watch = interrupts.watch_parent(str(os.getppid()), poll_s=0.05)
        assert watch is not None
        try:
            with interrupts.handle_signals():
                time.sleep(60)
        except interrupts.Interrupted as stop:
            open({str(marker)!r}, "w").write(stop.reason)
        """
    )
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); "
            "time.sleep(60)",
        ],
    )
    time.sleep(3)  # the child imports normbench and starts watching
    parent.kill()
    parent.wait()
    deadline = time.time() + 20
    while time.time() < deadline and not marker.exists():
        time.sleep(0.05)
    assert marker.read_text() == "the sweep's driver process died"


def test_no_watch_in_the_driver_or_for_foreign_parents():
    assert interrupts.watch_parent(None) is None
    assert interrupts.watch_parent(str(os.getpid())) is None  # the driver itself
    if os.getppid() != 1:
        assert interrupts.watch_parent("1") is None  # pid 1 is not this process's parent


def _run_command(tmp_path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "normbench.cli",
        "run",
        f"out_dir={tmp_path}",
        "epochs=100000",
        "dataset.train_size=128",
        "threads=1",
    ]


def test_closing_the_terminal_records_the_run_interrupted(tmp_path):
    """The terminal window of `normbench run` closed (its terminal hung up, SIGHUP to the
    job): exit 129, the run recorded interrupted with the reason, no lock left (was: the
    process died at once, no summary and a stale lock)."""
    runs = tmp_path / "default" / "runs"
    with Terminal(_run_command(tmp_path)) as term:
        deadline = time.time() + 120
        while time.time() < deadline and not list(runs.glob("*/metrics.csv")):
            time.sleep(0.05)
        time.sleep(0.5)
        term.close()
        assert term.process.wait(timeout=60) == 129
    assert b"Traceback" not in term.output
    (summary,) = [json.loads(p.read_text()) for p in runs.glob("*/summary.json")]
    assert summary["status"] == "interrupted" and "SIGHUP" in summary["error"]
    assert not list(runs.glob("*/.lock"))


HELD_BACK = """
import os, signal, sys, threading
from normbench import interrupts

if sys.argv[1] == "thread":  # another thread, its signal mask its own (OpenBLAS's pool)
    threading.Thread(target=threading.Event().wait, daemon=True).start()
order = []
with interrupts.handle_signals():
    try:
        with interrupts.held_back():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100_000):  # where a handler that came would have run
                pass
            import json  # noqa: F401 - stands for torch's import
            order.append("imported")
        order.append("after")
    except interrupts.Interrupted:
        order.append("stopped")
print(",".join(order))
print(signal.pthread_sigmask(signal.SIG_BLOCK, []) == set())
print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
"""


@pytest.mark.parametrize("threads", ["alone", "thread"])
def test_a_stop_signal_while_held_back_is_delivered_as_it_is_left(threads):
    """A SIGTERM while torch imports (interrupts.held_back) does not raise halfway through
    the import: it is delivered where the scope is left, and nothing stays blocked or
    replaced. Also with a second thread, to which the kernel sends a signal the main
    thread blocks (was: blocked in the main thread only, the handler ran mid-import)."""
    done = subprocess.run(
        [sys.executable, "-c", HELD_BACK, threads], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.split() == ["imported,stopped", "True", "True"], done.stderr


HELD_THEN_HANDLED = """
import contextlib, os, signal, sys
from normbench import interrupts

order = []
signal.signal(signal.SIGTERM, lambda signum, frame: order.append("bypassed"))  # submitit's
for early in (True, False):
    held = contextlib.ExitStack()
    held.enter_context(interrupts.held_back())  # a sweep job's imports
    if early:
        os.kill(os.getpid(), signal.SIGTERM)
    with interrupts.handle_signals():
        try:
            held.close()
            order.append("released")
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100_000):
                pass
            order.append("ran on")
        except interrupts.Interrupted:
            order.append("stopped")
os.kill(os.getpid(), signal.SIGTERM)
print(",".join(order))
"""


def test_held_back_left_inside_handle_signals_hands_over_to_its_handlers():
    """A sweep job's order: its imports held back, then the run's signal handling entered,
    then the imports' scope left. A signal that came while importing stops the run where
    the scope is left; once left, the next one stops it too (was: the scope put back the
    handler it had replaced, submitit's, which ignores SIGTERM, over handle_signals'); and
    after both, the handler from before is back."""
    done = subprocess.run(
        [sys.executable, "-c", HELD_THEN_HANDLED], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.split() == ["stopped,released,stopped,bypassed"], done.stderr


HELD_AROUND_HANDLED = """
import os, signal, threading, time
from normbench import interrupts

order = []
signal.signal(signal.SIGUSR2, lambda signum, frame: order.append("usr2"))  # submitit's
with interrupts.held_back():
    with interrupts.handle_signals():
        pass
    os.kill(os.getpid(), signal.SIGUSR2)
    for _ in range(100_000):
        pass
    order.append("imported")
order.append("left")
# A main thread that blocks SIGTERM (a mask it inherited) and a thread that does not:
# the signal, noted while held, is still delivered where the scope is left.
threading.Thread(target=threading.Event().wait, daemon=True).start()
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
with interrupts.handle_signals():
    try:
        with interrupts.held_back():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # the other thread takes it; Python runs the handler here
            order.append("imported")
        order.append("ran on")
    except interrupts.Interrupted:
        order.append("stopped")
print(",".join(order))
"""


def test_held_back_holds_until_it_is_left_and_delivers_to_a_main_thread_that_blocks():
    """handle_signals entered and left inside held_back: the handler it puts back is the
    noting one while the scope is open (was: submitit's, which would run mid-import).
    A main thread whose mask blocks the signal (only another thread takes it): the noted
    signal is handed to its handler all the same (was: raised to the main thread, where
    it stayed pending)."""
    done = subprocess.run(
        [sys.executable, "-c", HELD_AROUND_HANDLED], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.split() == ["imported,usr2,left,imported,stopped"], done.stderr


TORCH_WATCH = """
import json, os, sys
from pathlib import Path

class FirstTorchImport:  # notes whether normbench.interrupts.held_back holds the signals
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and self in sys.meta_path:
            sys.meta_path.remove(self)
            interrupts = sys.modules.get("normbench.interrupts")
            held = getattr(interrupts, "_holding", 0)
            Path(os.environ["TORCH_WATCH_DIR"], f"{os.getpid()}.json").write_text(
                json.dumps([held, sys.argv])
            )
        return None

sys.meta_path.insert(0, FirstTorchImport())
"""


def test_a_run_imports_torch_only_where_the_stop_signals_are_held_back(tmp_path):
    """A time limit's signal while torch imports left it half initialized, and the run
    was recorded ``failed`` (AttributeError: partially initialized module 'torch'), not
    ``interrupted`` (seen on SLURM: the runner listed the run's files through the
    checkpoint module, importing torch before its held-back import). Every process that
    trains a run, ``normbench run``'s and a sweep job's, first imports torch held back."""
    hook, seen = tmp_path / "hook", tmp_path / "seen"
    hook.mkdir()
    seen.mkdir()
    (hook / "sitecustomize.py").write_text(TORCH_WATCH)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
        "TORCH_WATCH_DIR": str(seen),
    }
    out = f"out_dir={tmp_path / 'out'}"
    tiny = ["epochs=1", "dataset.train_size=64", "batch_size=16", "threads=1", out]
    for command in (["run"], ["sweep", "hydra/launcher=submitit_local", "seed=1"]):
        done = subprocess.run(
            [sys.executable, "-m", "normbench.cli", *command, *tiny],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
    held = [json.loads(path.read_text()) for path in seen.glob("*.json")]
    # normbench run's process, and the sweep's job's (submitit's job script); the
    # sweep's driver imports torch to check the planned model, before any run starts
    trainers = [
        (count, argv)
        for count, argv in held
        if argv[1:2] == ["run"] or argv[0].endswith(os.path.join("submitit", "core", "_submit.py"))
    ]
    assert len(trainers) == 2, held
    assert all(count == 1 for count, _ in trainers), trainers
