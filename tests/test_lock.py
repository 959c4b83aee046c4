"""Tests for normbench.lock: one owner per run folder, stale locks taken over, and two real
processes given the same run (exactly one trains; the finished run survives)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from normbench import lock
from normbench.lock import RunBusy, RunLock, break_lock, read_owner


def write_lock(folder: Path, **fields) -> None:
    record = {
        "host": "elsewhere",
        "boot_id": "other-boot",
        "pid": 12345,
        "start_time": "1",
        "slurm_job": None,
        "token": "t0",
        **fields,
    }
    (folder / lock.LOCK_NAME).write_text(json.dumps(record))


def age(folder: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(folder / lock.LOCK_NAME, (then, then))


def test_a_lock_is_exclusive_and_released(tmp_path):
    with RunLock(tmp_path) as held:
        owner = read_owner(tmp_path)
        assert owner is not None and owner.alive and owner.local
        assert owner.pid == os.getpid() and owner.token == held.token
        with pytest.raises(RunBusy, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    assert read_owner(tmp_path) is None
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary file left either


def test_the_heartbeat_moves_the_mtime(tmp_path):
    with RunLock(tmp_path, heartbeat_s=0.05):
        age(tmp_path, 100)
        time.sleep(0.3)
        assert read_owner(tmp_path).age_s < 5


def test_a_dead_local_owner_is_stale_and_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = lock._identity()
    write_lock(tmp_path, host=me["host"], boot_id=me["boot_id"], pid=dead.pid, start_time="1")
    assert not read_owner(tmp_path).alive
    with RunLock(tmp_path) as held:
        assert read_owner(tmp_path).token == held.token


def test_a_reused_pid_does_not_keep_a_lock_alive(tmp_path):
    me = lock._identity()
    # this very process, but the start time recorded is another process's
    write_lock(tmp_path, host=me["host"], boot_id=me["boot_id"], pid=os.getpid(), start_time="0")
    assert not read_owner(tmp_path).alive


def test_another_machines_lock_lives_until_its_heartbeat_is_old(tmp_path):
    write_lock(tmp_path)  # another host: its pid cannot be checked
    owner = read_owner(tmp_path, stale_s=60)
    assert owner.alive and not owner.local
    with pytest.raises(RunBusy, match="pid 12345 on elsewhere"):
        RunLock(tmp_path, stale_s=60).acquire()
    age(tmp_path, 61)
    assert not read_owner(tmp_path, stale_s=60).alive
    with RunLock(tmp_path, stale_s=60) as held:
        assert read_owner(tmp_path).token == held.token


def test_an_unreadable_lock_file_counts_by_its_age(tmp_path):
    (tmp_path / lock.LOCK_NAME).write_text("not json")
    owner = read_owner(tmp_path, stale_s=60)
    assert owner.alive and owner.token is None
    age(tmp_path, 61)
    with RunLock(tmp_path, stale_s=60):
        pass


def test_an_earlier_instance_of_this_slurm_job_is_stale(tmp_path, monkeypatch):
    """A requeued SLURM job keeps its id: its earlier instance's lock is not alive."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    write_lock(tmp_path, slurm_job="77")  # fresh heartbeat, another host
    assert not read_owner(tmp_path).alive
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    assert read_owner(tmp_path).alive


def test_array_tasks_are_named_as_sacct_names_them(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "105")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "100")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    assert lock.slurm_job() == "100_5"


def test_breaking_a_lock_that_was_replaced_meanwhile_puts_it_back(tmp_path):
    write_lock(tmp_path, token="new-owner")
    assert break_lock(tmp_path, "the-stale-one") is False
    assert read_owner(tmp_path).token == "new-owner"
    assert break_lock(tmp_path, "new-owner") is True
    assert read_owner(tmp_path) is None


# ------------------------------------------------------------------ two real processes

RUN = [
    "epochs=60",
    "dataset.train_size=256",
    "batch_size=16",
    "threads=1",
    "norm=layer",
]


def test_two_processes_on_one_run_exactly_one_trains(tmp_path):
    """Started together, one process trains and the other refuses at once (exit 2); the
    refused one touches nothing, and a third started after the first finished skips."""
    args = [sys.executable, "-m", "normbench.cli", "run", f"out_dir={tmp_path}", *RUN]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = tmp_path / "default" / "runs"
    deadline = time.time() + 120
    while time.time() < deadline and not list(runs.glob("*/.lock")):
        assert first.poll() is None, first.communicate()
        time.sleep(0.05)
    second = subprocess.run(args, capture_output=True, text=True)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 2
    assert "in progress elsewhere" in second.stderr and "Traceback" not in second.stderr
    assert f"pid {first.pid}" in second.stderr

    (folder,) = runs.iterdir()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 60
    epochs = {int(line.split(",")[1]) for line in (folder / "metrics.csv").read_text().split()[1:]}
    assert epochs == set(range(1, 61))  # one run's metrics, whole: nobody truncated them
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["config.yaml", "metrics.csv", "summary.json"]

    third = subprocess.run(args, capture_output=True, text=True)
    assert third.returncode == 0 and "already done" in third.stdout
    assert json.loads((folder / "summary.json").read_text()) == summary
