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

import pytest

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


def test_sigterm_during_a_run_records_it_interrupted(tmp_path):
    """`normbench run` killed with SIGTERM: exit 143, one line, summary says why."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "normbench.cli",
            "run",
            f"out_dir={tmp_path}",
            "epochs=100000",
            "dataset.train_size=128",
            "threads=1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    runs = tmp_path / "default" / "runs"
    deadline = time.time() + 120
    while time.time() < deadline and not list(runs.glob("*/metrics.csv")):
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143
    assert "terminated by SIGTERM" in err and "Traceback" not in err
    (summary,) = [json.loads(p.read_text()) for p in runs.glob("*/summary.json")]
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["error"]
    assert not list(runs.glob("*/.lock"))


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
