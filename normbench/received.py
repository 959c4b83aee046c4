"""Reading the files of a folder normbench did not write itself: a results folder someone
sent, or a run folder another process left.

Such a folder may hold anything under a run file's name: a named pipe (opening it to read
waits for a writer forever), a link to ``/dev/zero`` (endless) or to a device, a file of
gigabytes, JSON nested a million levels deep. :func:`read_bytes` reads a file only when it
is a regular file no larger than its kind's cap (``*_MAX``), checked before it is opened
and again on the open descriptor (opened non-blocking, so that a pipe swapped in between
cannot block): anything else raises :class:`Refused`, an ``OSError`` whose ``strerror``
says why in a few words, which every reader already treats as a damaged file.
:func:`load_json` is ``json.loads`` with nesting too deep for Python's recursion limit as
a ``ValueError``, like any other JSON that does not parse.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from typing import Any

#: Caps in bytes, per kind of file. normbench writes a summary.json, a config.yaml, a lock
#: or a queue marker of a few KB, and a metrics.csv of about 1 KB per epoch: the caps are
#: far above anything it writes, and far below what would exhaust a machine's memory.
SUMMARY_MAX = 1 << 20
CONFIG_MAX = 1 << 20
METRICS_MAX = 256 << 20
MARKER_MAX = 64 << 10  # a run's .lock and .queued
TABLE_MAX = 64 << 20  # an experiment's selected.csv


class Refused(OSError):
    """A file that is not read: not a regular file, or larger than its kind's cap."""

    def __init__(self, path: str, why: str):
        super().__init__(errno.EINVAL, why, path)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def _size(count: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift:
            return f"{count / (1 << shift):.3g} {unit}"
    return f"{count} bytes"


def _check(path: str, info: os.stat_result, limit: int | None) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise Refused(path, f"{_kind(info.st_mode)}, not a file")
    if limit is not None and info.st_size > limit:
        too_large = f"{_size(info.st_size)}, more than the {_size(limit)} such a file may be"
        raise Refused(path, too_large)


def read_bytes(path: str | os.PathLike, limit: int | None) -> bytes:
    """The file's bytes, when it is a regular file (a link to one is followed) of at most
    ``limit`` bytes (None: any size). ``FileNotFoundError`` (and other ``OSError``) as
    ``open`` raises them; :class:`Refused` for anything else."""
    path = os.fspath(path)
    # Checked before opening: opening some devices does something (a watchdog starts).
    _check(path, os.stat(path), limit)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    with open(fd, "rb") as handle:
        _check(path, os.fstat(fd), limit)  # replaced between the check and the open
        data = handle.read() if limit is None else handle.read(limit + 1)
    if limit is not None and len(data) > limit:  # grown since
        raise Refused(path, f"more than the {_size(limit)} such a file may be")
    return data


def load_json(data: bytes | str) -> Any:
    """``json.loads``, with nesting deeper than Python's recursion limit a ``ValueError``
    (as any JSON that does not parse) rather than a ``RecursionError``."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None
