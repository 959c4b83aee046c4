"""The scripts under benchmarks/: the shell ones at least parse.

benchmarks/gpu_check.sh runs only where a GPU is lent, a few minutes at a time: a syntax
error found there would cost that session its run. ``bash -n`` reads a script without
running it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).parents[1] / "benchmarks").glob("*.sh"))


def test_there_are_shell_scripts():
    assert {p.name for p in SCRIPTS} >= {"gpu_check.sh", "gpu_wheels.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_the_shell_script_parses(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
