"""A command run on a pseudo-terminal, as in a terminal window, and the window closed.

Closing a terminal window hangs its terminal up (every later write to it fails with
EIO), and the shell sends SIGHUP to each of its jobs' process groups: the command and
every process it started (a sweep's workers) get the signal at once. :class:`Terminal`
does the same to a command started in a process group of its own::

    with Terminal([sys.executable, "-m", "normbench.cli", "run"], cwd=tmp_path) as term:
        ...                      # wait until it trains
        term.close()             # the window closes
        term.process.wait(60)    # 129: stopped by SIGHUP
"""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import subprocess
import threading


class Terminal:
    """``command`` with a pseudo-terminal for stdin, stdout and stderr, whose output is
    read (a terminal shows it: a full one would block the writer) into ``output``."""

    def __init__(self, command: list[str], **popen):
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(
            command, stdin=slave, stdout=slave, stderr=slave, start_new_session=True, **popen
        )
        os.close(slave)
        self.output = bytearray()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(self.master, 65536)
            except OSError:  # the command closed its side (it ended)
                return
            if not data:
                return
            self.output.extend(data)

    def close(self) -> None:
        """Close the window: the terminal is hung up, then its job gets SIGHUP."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._reader.join()
        os.close(self.master)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGHUP)

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        with contextlib.suppress(ProcessLookupError):  # what is left, after a failed test
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
