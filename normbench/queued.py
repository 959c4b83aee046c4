"""Runs queued on SLURM: a marker in the run folder while its job waits or runs.

A run's lock says who trains it; a job still pending has no lock yet. So a sweep's
driver writes ``<run_dir>/.queued`` (the SLURM job, its name, the host that submitted
it, when) as soon as ``sbatch`` has given each job its id, and removes it when it
collects or cancels the job; the job removes it when its run ends with a result. A
driver killed outright (``kill -9``, a lost login node) leaves the markers, and the
jobs go on: a rerun's plan asks SLURM, in one ``squeue`` call
(:class:`QueueCheck`), which markers' jobs it still lists as pending or running under
the same name, and leaves those runs to their jobs, as it leaves runs locked by a live
process. A marker whose job SLURM no longer lists (ended, cancelled, unknown), or that
cannot be checked (no ``squeue`` here), is ignored: the run is submitted again, and its
lock still lets only one job train it.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = ".queued"

#: SLURM's states of a job that will still run its run (``squeue --states``).
ACTIVE = (
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "SUSPENDED",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "STOPPED",
)

#: Seconds ``squeue`` may take before the markers are ignored (a controller not answering).
SQUEUE_TIMEOUT_S = 30.0


@dataclass
class Queued:
    """A run's SLURM job, pending or running, as a plan finds it (``Job.busy``)."""

    slurm_job: str
    name: str
    state: str
    host: str

    def describe(self) -> str:
        state = self.state.lower()
        return f"SLURM job {self.slurm_job} ({state}), queued by a sweep on {self.host}"


def write(run_dir: Path, slurm_job: str, name: str) -> None:
    """Mark the run as queued in ``slurm_job`` (named ``name``); a marker that cannot be
    written (a full disk) is left out: a rerun would then submit the run again."""
    from normbench.errors import NotWritten
    from normbench.rundir import write_json

    record = {
        "slurm_job": str(slurm_job),
        "name": str(name),
        "host": socket.gethostname(),
        "submitted": time.time(),
    }
    with contextlib.suppress(NotWritten, OSError):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(run_dir) / MARKER, record)


def read(run_dir: Path) -> dict[str, Any] | None:
    """The run's marker, or None (none, or not one this module wrote)."""
    from normbench import received

    try:  # a regular file of a few KB: a received folder's may be a pipe or a device
        data = received.read_bytes(Path(run_dir) / MARKER, received.MARKER_MAX)
        record = received.load_json(data)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("slurm_job"), str):
        return None
    return record


def remove(run_dir: Path, slurm_job: str | None) -> None:
    """Remove the run's marker if it names ``slurm_job`` (another sweep's job may have
    replaced it since)."""
    record = read(run_dir)
    if record is not None and slurm_job is not None and record["slurm_job"] == str(slurm_job):
        with contextlib.suppress(OSError):
            (Path(run_dir) / MARKER).unlink()


class QueueCheck:
    """Which run folders' markers name a job SLURM still has pending or running: one
    ``squeue`` call, made at the first marker found (none when there is no marker)."""

    def __init__(self) -> None:
        self._active: dict[str, tuple[str, str]] | None = None

    def find(self, run_dir: Path) -> Queued | None:
        record = read(run_dir)
        if record is None:
            return None
        if self._active is None:
            self._active = _squeue()
        listed = self._active.get(record["slurm_job"])
        if listed is None or listed[1] != record.get("name"):
            return None  # ended, cancelled, unknown; or another cluster's job of that id
        return Queued(record["slurm_job"], listed[1], listed[0], str(record.get("host")))


def _squeue() -> dict[str, tuple[str, str]]:
    """Job id -> (state, name) of this user's SLURM jobs that are pending or running,
    array tasks one by one (``123_4``); empty when SLURM cannot be asked."""
    try:
        listed = subprocess.run(
            ["squeue", "--me", "-h", "-r", "-t", ",".join(ACTIVE), "-o", "%i %T %j"],
            capture_output=True,
            text=True,
            timeout=SQUEUE_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if listed.returncode != 0:
        return {}
    active = {}
    for line in listed.stdout.splitlines():
        fields = line.split(" ", 2)
        if len(fields) == 3:
            active[fields[0]] = (fields[1], fields[2])
    return active
