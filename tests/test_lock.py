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


# ---------------------------------------------------- what a received folder may hold


def test_a_lock_from_the_future_of_every_clock_is_no_heartbeat(tmp_path):
    """Another machine's lock whose mtime is far ahead of this machine's clock and of the
    file system's (a copy that kept the times of a machine whose clock ran ahead) is
    stale at once; a little ahead (clock skew), it is alive until it is ``stale_s``
    old, so a gone owner blocks the run for at most twice ``stale_s``."""
    write_lock(tmp_path)
    age(tmp_path, -30)  # 30 s ahead
    owner = read_owner(tmp_path, stale_s=60)
    assert owner.alive and owner.age_s == 0
    with pytest.raises(RunBusy, match="pid 12345 on elsewhere"):
        RunLock(tmp_path, stale_s=60).acquire()
    age(tmp_path, -86400 * 365)  # a year ahead: before, "last heartbeat 0 s ago" for a year
    assert not read_owner(tmp_path, stale_s=60).alive
    with RunLock(tmp_path, stale_s=60) as held:
        assert read_owner(tmp_path).token == held.token
    # the file system's clock was read from a file created and removed beside the lock
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_unparsable_lock_from_the_future_is_stale_too(tmp_path):
    (tmp_path / lock.LOCK_NAME).write_text("not json")
    age(tmp_path, -86400)
    owner = read_owner(tmp_path, stale_s=60)
    assert not owner.alive
    assert owner.describe().startswith("a lock file normbench cannot read")
    with RunLock(tmp_path, stale_s=60):
        pass


def test_the_file_systems_clock_is_a_new_files_mtime(tmp_path):
    before = time.time()
    now = lock._file_system_now(tmp_path)
    assert before - 1 <= now <= time.time() + 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["folder", "symlink", "fifo"])
def test_a_lock_that_is_not_a_file_is_a_user_error_not_a_wait(tmp_path, kind):
    path = tmp_path / lock.LOCK_NAME
    if kind == "folder":
        path.mkdir()
        (path / "inside").write_text("kept")
    elif kind == "symlink":
        (tmp_path / "elsewhere").write_text("{}")
        path.symlink_to(tmp_path / "elsewhere")
    else:
        os.mkfifo(path)
    expected = {"folder": "a folder", "symlink": "a symbolic link", "fifo": "a special file"}
    with pytest.raises(lock.LockNotAFile, match=f"is {expected[kind]}.*, not a run lock"):
        read_owner(tmp_path)
    with pytest.raises(lock.LockNotAFile):
        RunLock(tmp_path).acquire()
    assert path.exists() or path.is_symlink()  # never removed: not normbench's
    assert not list(tmp_path.glob(".lock.*"))  # nor a temporary file left


def test_a_run_whose_lock_is_a_folder_says_so_in_one_line(tmp_path):
    """``normbench run`` and ``normbench sweep`` on a run folder holding a ``.lock``
    folder: one line naming it, exit 2, nothing written (before: "in progress elsewhere
    (pid -1 on ?)" on every try)."""
    from typer.testing import CliRunner

    from normbench.cli import app
    from normbench.config import compose
    from normbench.runner import run_dir

    args = [f"out_dir={tmp_path / 'results'}", "epochs=1", "dataset.train_size=128", "threads=1"]
    folder = run_dir(compose(args))
    (folder / lock.LOCK_NAME).mkdir(parents=True)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for command in (["run", *args], ["sweep", *args, "seed=0,1"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
        assert f"{folder / lock.LOCK_NAME} is a folder, not a run lock" in lines[0]
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    "fields",
    [
        {"pid": 999999, "start_time": None},
        {"pid": -1, "start_time": None},
        {"pid": 0, "start_time": "1"},
        {"pid": 2**70, "start_time": None},
        {"pid": "12", "start_time": "1"},
        {"pid": 4, "start_time": 7},
        {"pid": 4, "start_time": "1", "token": 5},
        {"pid": 4, "start_time": "1", "host": ["x"]},
    ],
    ids=[
        "dead-pid-null-start",
        "pid-1",
        "pid0",
        "pid-2**70",
        "pid-text",
        "start-int",
        "token-int",
        "host-list",
    ],  # fmt: skip
)
def test_a_lock_not_as_normbench_writes_it_is_judged_by_its_heartbeat(tmp_path, fields):
    """A lock of this machine whose fields are not what normbench writes (before: a dead
    pid with a null start time matched the dead pid's null and blocked the run forever,
    "in progress elsewhere ... last heartbeat 10802 s ago"; a pid of 2**70 could
    overflow): alive while its heartbeat is fresh, stale after STALE_S."""
    me = lock._identity()
    write_lock(tmp_path, **{"host": me["host"], "boot_id": me["boot_id"], **fields})
    owner = read_owner(tmp_path)
    assert owner.alive and owner.describe().startswith("a lock file normbench cannot read")
    with pytest.raises(RunBusy):
        RunLock(tmp_path).acquire()
    age(tmp_path, 3 * 3600)
    assert not read_owner(tmp_path).alive
    with RunLock(tmp_path) as held:
        assert read_owner(tmp_path).token == held.token


@pytest.mark.parametrize("content", ["[" * 100_000, "{" + " " * (1 << 17) + "}"])
def test_a_lock_nested_too_deep_or_too_large_is_garbage_not_a_crash(tmp_path, content):
    (tmp_path / lock.LOCK_NAME).write_text(content)
    age(tmp_path, 3 * 3600)
    assert not read_owner(tmp_path).alive
    with RunLock(tmp_path):
        pass
