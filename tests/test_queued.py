"""Tests for normbench.queued: a run's SLURM job counts as queued while the real cluster's
``squeue`` lists it, under the name the marker holds; otherwise its marker is ignored."""

from __future__ import annotations

import json
import subprocess
import time
import uuid

from test_launchers_slurm import slurm  # noqa: F401  (the module's one-node cluster)

from normbench import queued


def _held_job(name: str) -> str:
    """A SLURM job that stays pending (held) at no cost: its id."""
    return subprocess.run(
        ["sbatch", "--parsable", "--hold", "-J", name, "-c", "1", "--wrap", "true"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_a_marker_counts_while_slurm_lists_its_job_under_its_name(slurm, tmp_path):  # noqa: F811
    name = f"nbq{uuid.uuid4().hex[:8]}"
    job = _held_job(name)
    try:
        queued.write(tmp_path / "run", job, name)
        record = json.loads((tmp_path / "run" / queued.MARKER).read_text())
        assert (record["slurm_job"], record["name"]) == (job, name)
        found = queued.QueueCheck().find(tmp_path / "run")
        assert (found.slurm_job, found.state) == (job, "PENDING")
        assert found.describe().startswith(f"SLURM job {job} (pending), queued by a sweep on ")
        # the same id under another name: another cluster's job, not this run's
        queued.write(tmp_path / "other", job, "someone-else")
        assert queued.QueueCheck().find(tmp_path / "other") is None
    finally:
        subprocess.run(["scancel", job], check=True)
    deadline = time.time() + 30
    while time.time() < deadline and queued.QueueCheck().find(tmp_path / "run") is not None:
        time.sleep(0.2)
    assert queued.QueueCheck().find(tmp_path / "run") is None  # cancelled: ignored


def test_a_marker_is_removed_only_by_its_own_job(tmp_path):
    queued.write(tmp_path, "41_3", "nb")
    queued.remove(tmp_path, "41_2")  # a later sweep's job replaced it: not this one's
    queued.remove(tmp_path, None)
    assert queued.read(tmp_path)["slurm_job"] == "41_3"
    queued.remove(tmp_path, "41_3")
    assert queued.read(tmp_path) is None
    assert queued.QueueCheck().find(tmp_path) is None  # no marker: no squeue asked


def test_a_marker_not_written_by_normbench_is_ignored(tmp_path):
    (tmp_path / queued.MARKER).write_text("[1, 2]")
    assert queued.read(tmp_path) is None
    (tmp_path / queued.MARKER).write_text("{not json")
    assert queued.QueueCheck().find(tmp_path) is None


def test_a_marker_that_is_a_pipe_or_nested_too_deep_is_ignored_without_blocking(tmp_path):
    """Before: a pipe named .queued in a received run folder hung the sweep's plan."""
    import os

    from hostile import deadline

    os.mkfifo(tmp_path / queued.MARKER)
    with deadline():
        assert queued.read(tmp_path) is None
    (tmp_path / queued.MARKER).unlink()
    (tmp_path / queued.MARKER).write_text("[" * 100_000)  # before: RecursionError
    assert queued.read(tmp_path) is None
