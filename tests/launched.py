"""Sweeps started as a user starts them, for the tests of real engines
(tests/test_launchers.py: submitit_local, joblib, Ray; tests/test_launchers_slurm.py: SLURM):
``normbench sweep`` in a subprocess from a folder, its runs' summaries and locks read back,
and a skip that CI turns into a failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

TINY = ["dataset.train_size=256", "batch_size=16", "norm=layer"]


def unavailable(reason: str):
    """Skip, with the reason; under CI a missing engine is a failure, never a skip."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test: {reason}")
    pytest.skip(reason)


def sweep(cwd: Path, *overrides: str, timeout: float = 400) -> subprocess.CompletedProcess:
    """``normbench sweep`` as a user runs it, from ``cwd`` (results go to cwd/results)."""
    return subprocess.run(
        [sys.executable, "-m", "normbench.cli", "sweep", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_sweep(cwd: Path, *overrides: str, quiet: bool = False) -> subprocess.Popen:
    """``normbench sweep`` started in the background from ``cwd``, its output piped as
    text (``quiet``: discarded), for a test to act on while it runs."""
    output = subprocess.DEVNULL if quiet else subprocess.PIPE
    return subprocess.Popen(
        [sys.executable, "-m", "normbench.cli", "sweep", *overrides],
        cwd=cwd,
        stdout=output,
        stderr=output,
        text=not quiet,
    )


def summaries(cwd: Path, name: str = "default") -> dict[int, dict]:
    """Each run's summary by its epochs (the tests sweep epochs to tell runs apart)."""
    found = {}
    for path in (cwd / "results" / name / "runs").glob("*/summary.json"):
        record = json.loads(path.read_text())
        found[record["epochs"]] = record
    return found


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def lock_of(cwd: Path, epochs: int) -> dict | None:
    """The lock record of the run with ``epochs`` epochs, once it trains."""
    try:
        configs = list((cwd / "results" / "default" / "runs").glob("*/config.yaml"))
        for path in configs:
            if f"\nepochs: {epochs}\n" in f"\n{path.read_text()}":
                return json.loads((path.parent / ".lock").read_text())
    except (OSError, ValueError):
        # Not there yet, or going: a job's check that it can write its folder makes the
        # missing parents and removes them again (rundir), under this glob's feet.
        return None
    return None
