"""Run ownership: one process at a time per run folder, across machines sharing a file system.

A run's lock is ``<run_dir>/.lock``, written whole under a private name and then
hard-linked to its name (``link`` fails when the name exists: atomic on local file
systems and on NFS, the classic NFS-safe lock), holding who owns it: host, boot id, pid and the
process's start time, the SLURM job when there is one, and a random token. While the
run trains, a thread touches the file every ``HEARTBEAT_S`` seconds: its mtime is the
heartbeat.

A lock is *stale*, and may be taken over, when its owner is known to be gone:
- on the same machine (same host name and boot id), its pid no longer runs the process
  that took it (gone, or reused by another: the start time differs);
- from another machine, whose processes cannot be checked, its heartbeat is older than
  ``STALE_S``, or more than ``STALE_S`` ahead of the file system's clock (below);
- its SLURM job is one the caller knows has ended (the sweep's driver, told by SLURM).

A heartbeat's age is this machine's clock less the lock's mtime. An owner on another
machine touches the lock with the file system's clock (NFS sets a touched file's times
to the server's), so an mtime ahead of this machine's clock is first compared with the
file system's own: the mtime of a file created beside it. An mtime more than
``STALE_S`` ahead even of that was set by no heartbeat (a copy that kept the times of a
machine whose clock ran ahead, ``touch -d``): that lock is stale, where counting its age
from the future would block the run until the clock caught up, hours or years later.
So a lock whose owner is gone blocks a run for at most twice ``STALE_S``.

A ``.lock`` that is not a regular file (a folder, a link, a pipe) is no lock normbench
wrote, nor one it may remove: :class:`LockNotAFile`, a user error naming it.

Taking over renames the stale file aside first and checks that what was renamed is
the lock that was judged stale, so two processes that both find it stale do not both
take it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normbench import interrupts, received
from normbench.errors import UserError

LOCK_NAME = ".lock"

#: Seconds between heartbeats of a lock's owner.
HEARTBEAT_S = 15.0

#: A lock from another machine whose heartbeat is older than this is stale, in seconds.
#: Generous against clock skew between machines and a paused (swapping) owner.
STALE_S = 120.0


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def pid_running(pid: int) -> bool:
    """Whether some process on this machine has ``pid``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


def _running(pid: int, start_time: str | None) -> bool:
    """Whether ``pid`` still runs the process that started at ``start_time``."""
    if interrupts.start_time(os.getpid()) is None:  # no /proc (macOS): the pid alone must do
        return pid_running(pid)
    return interrupts.start_time(pid) == start_time


def slurm_job() -> str | None:
    """This process's SLURM job as ``sacct`` names it (``123_4`` for an array task)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def _identity() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid": pid,
        "start_time": interrupts.start_time(pid),
        "slurm_job": slurm_job(),
    }


@dataclass
class Owner:
    """Who holds a lock, as its file says, and how long ago it last beat."""

    host: str
    pid: int
    slurm_job: str | None
    age_s: float
    local: bool  # on this machine: the pid can be checked
    alive: bool  # as far as can be told
    token: str | None

    def describe(self) -> str:
        if self.pid == -1 and self.host == "?":  # a lock file that could not be parsed
            return f"a lock file normbench cannot read as its own, touched {self.age_s:.0f} s ago"
        where = f"pid {self.pid} on {self.host}" + (
            f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        )
        return f"{where}, last heartbeat {self.age_s:.0f} s ago"


class LockNotAFile(UserError):
    """A ``.lock`` that is a folder, a link or another non-regular file: no lock of
    normbench's, and nothing it may remove or wait for."""

    def __init__(self, path: Path, mode: int):
        kind = (
            "a folder"
            if stat.S_ISDIR(mode)
            else "a symbolic link"
            if stat.S_ISLNK(mode)
            else "a special file (a pipe, socket or device)"
        )
        super().__init__(
            f"{path} is {kind}, not a run lock (a file normbench writes while a run "
            "trains): remove it and run again"
        )
        self.path = path


#: How far ahead of this machine's clock a heartbeat may be before the file system's
#: clock is asked (timestamps' granularity, attribute caches), in seconds.
CLOCK_SLACK_S = 2.0


def _file_system_now(folder: Path) -> float | None:
    """The file system's clock: the mtime of a file created in ``folder`` (None when
    nothing can be created there)."""
    probe = folder / f"{LOCK_NAME}.clock.{secrets.token_hex(6)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError:
        return None
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)


def _heartbeat_age(folder: Path, mtime: float) -> float:
    """Seconds since the heartbeat at ``mtime``; negative when it is ahead of the file
    system's clock as well as this machine's."""
    now = time.time()
    if mtime - now > CLOCK_SLACK_S:  # ahead of this machine: ask the file system's clock
        measured = _file_system_now(folder)
        now = now if measured is None else measured
    return now - mtime


def read_owner(folder: Path, stale_s: float = STALE_S) -> Owner | None:
    """The lock's owner, or None when the folder has no lock. A lock file that cannot be
    parsed (written by something else) is alive while its mtime is a heartbeat less than
    ``stale_s`` old. :class:`LockNotAFile` when ``.lock`` is a folder or another kind of
    file."""
    path = Path(folder) / LOCK_NAME
    try:
        info = os.lstat(path)
    except OSError:  # none, or no folder to hold one (a file in its place, a name too long)
        return None
    if not stat.S_ISREG(info.st_mode):
        raise LockNotAFile(path, info.st_mode)
    try:
        data = received.read_bytes(path, received.MARKER_MAX)
    except FileNotFoundError:  # released meanwhile
        return None
    except OSError:  # not ours to read, or replaced by something else: its heartbeat alone
        data = b""
    age = _heartbeat_age(Path(folder), info.st_mtime)
    beating = -stale_s <= age <= stale_s  # far ahead of every clock: no heartbeat
    age = max(0.0, age)
    try:
        record = received.load_json(data.decode(errors="replace"))
    except ValueError:
        record = None
    me = _identity()
    if not _well_formed(record, me):  # not what normbench writes: judged by its heartbeat
        return Owner("?", -1, None, age, local=False, alive=beating, token=None)
    local = record.get("host") == me["host"] and record.get("boot_id") == me["boot_id"]
    pid = record.get("pid")
    if me["slurm_job"] and record.get("slurm_job") == me["slurm_job"]:
        # SLURM runs one instance of a job at a time: this is an earlier one (requeued).
        alive = pid == me["pid"] and local
    elif local:
        alive = _running(pid, record.get("start_time"))
    else:
        alive = beating
    return Owner(
        host=record["host"],
        pid=pid,
        slurm_job=record.get("slurm_job"),
        age_s=age,
        local=local,
        alive=alive,
        token=record.get("token"),
    )


#: The highest pid Linux gives (``PID_MAX_LIMIT``).
PID_MAX = 2**22


def _well_formed(record: Any, me: dict[str, Any]) -> bool:
    """Whether a lock's record holds what :func:`_identity` writes, each field of its type
    and range: a host and a boot id, a pid a process can have, a SLURM job or null, a
    token; and, in a lock of this machine (whose process is checked), a start time in
    clock ticks (null only where this machine has no /proc either). Anything else
    (hand-written, another program's, damaged) is no lock normbench can check a process
    of: its heartbeat alone says whether it lives, as for another machine's; a dead pid
    saved with a null start time would otherwise look alive forever."""
    if not isinstance(record, dict):
        return False
    pid, start, job = record.get("pid"), record.get("start_time"), record.get("slurm_job")
    if not (
        isinstance(record.get("host"), str)
        and isinstance(record.get("boot_id"), str)
        and type(pid) is int
        and 0 < pid <= PID_MAX
        and (job is None or isinstance(job, str))
        and isinstance(record.get("token"), str)
    ):
        return False
    if record["host"] != me["host"] or record["boot_id"] != me["boot_id"]:
        return True  # another machine's: its start time is never compared
    if isinstance(start, str) and start.isdigit():
        return True
    return start is None and me["start_time"] is None  # no /proc here either


class RunBusy(Exception):
    """The run is owned by another live process."""

    def __init__(self, folder: Path, owner: Owner):
        super().__init__(f"{folder} is in progress elsewhere ({owner.describe()})")
        self.folder, self.owner = folder, owner


class RunLock:
    """Exclusive ownership of one run folder, with a heartbeat while held.

    ``with RunLock(folder):`` takes the lock (raising :class:`RunBusy` if a live process
    holds it; a stale lock is taken over) and releases it on exit.
    """

    def __init__(
        self, folder: Path, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S
    ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        record = json.dumps({**_identity(), "token": self.token, "since": time.time()})
        # Written whole under a private name, then linked to the lock's name: link() fails
        # if the name exists, atomically, NFS included, and the lock is never seen empty.
        tmp = self.path.with_name(f"{LOCK_NAME}.{self.token}.tmp")
        try:
            tmp.write_text(record)
        except OSError as err:  # a read-only run folder, a full disk: the user's to fix
            from normbench.errors import NotWritten

            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise NotWritten(self.folder, err) from None
        try:
            for _ in range(3):  # lose a take-over race at most twice, then report the winner
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    owner = read_owner(self.folder, self.stale_s)
                    if owner is not None and owner.alive:
                        raise RunBusy(self.folder, owner) from None
                    if owner is not None:
                        break_lock(self.folder, owner.token)
                    continue
                self._thread = threading.Thread(target=self._beat, name="run-lock", daemon=True)
                self._thread.start()
                return
        finally:
            tmp.unlink(missing_ok=True)
        owner = read_owner(self.folder, self.stale_s)
        raise RunBusy(self.folder, owner or Owner("?", -1, None, 0.0, False, True, None))

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            owner = read_owner(self.folder, self.stale_s)
        except LockNotAFile:  # replaced by something else meanwhile: not ours to remove
            return
        if owner is not None and owner.token == self.token:
            self.path.unlink(missing_ok=True)


def break_lock(folder: Path, token: str | None) -> bool:
    """Remove the lock if it is still the one holding ``token`` (None: a file that could
    not be parsed); False when another process replaced it meanwhile."""
    path = Path(folder) / LOCK_NAME
    aside = path.with_name(f"{LOCK_NAME}.stale.{secrets.token_hex(6)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # someone else removed it: free
    try:
        record = received.load_json(received.read_bytes(aside, received.MARKER_MAX))
    except (OSError, ValueError):
        record = None
    moved = record.get("token") if isinstance(record, dict) else None
    if not _well_formed(record, _identity()):  # as read_owner saw it: no token
        moved = None
    if moved != token:
        # The lock was replaced between the check and the rename: put the new owner's
        # file back (link fails rather than overwrite if yet another appeared).
        with contextlib.suppress(OSError):
            os.link(aside, path)
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True
