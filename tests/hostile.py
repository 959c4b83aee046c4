"""Helpers for tests of what a received folder may hold.

:func:`deadline` turns a hang (a pipe opened for reading waits for a writer forever)
into a test failure. :func:`as_user` runs normbench commands as a user whom a folder's
mode stops: in this process when the tests do not run as root, else in one process
without root's rights to read and write past modes (``setpriv`` drops
CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH), as the tester found the failures.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

_DROP = "-dac_override,-dac_read_search"

# the commands, through Typer's CliRunner, in a process of their own: one JSON line back
_SCRIPT = """
import json, sys
from typer.testing import CliRunner
from normbench.cli import app
done = []
for args in json.loads(sys.argv[1]):
    result = CliRunner().invoke(app, args)
    done.append([result.exit_code, result.stdout, result.stderr])
print(json.dumps(done))
"""


@contextlib.contextmanager
def deadline(seconds: int = 30):
    """Raise TimeoutError in the test when it runs longer than ``seconds`` (a blocked
    ``open`` is interrupted too)."""

    def expire(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def as_user(commands: list[list[str]], cwd: Path) -> list[tuple[int, str, str]]:
    """Each command's (exit status, stdout, stderr), run in ``cwd`` by a user whom
    folder modes stop."""
    if os.geteuid() != 0:
        from typer.testing import CliRunner

        from normbench.cli import app

        done = []
        with contextlib.chdir(cwd):
            for args in commands:
                result = CliRunner().invoke(app, args)
                done.append((result.exit_code, result.stdout, result.stderr))
        return done
    if not shutil.which("setpriv"):
        if os.environ.get("CI"):
            pytest.fail("CI must run this test: dropping root's rights needs setpriv")
        pytest.skip("root without setpriv cannot be stopped by a folder's mode")
    drop = ["setpriv", f"--inh-caps={_DROP}", f"--bounding-set={_DROP}"]
    finished = subprocess.run(
        [*drop, sys.executable, "-c", _SCRIPT, json.dumps(commands)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    return [tuple(done) for done in json.loads(finished.stdout.splitlines()[-1])]
